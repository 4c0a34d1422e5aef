"""Run directories and their manifest: what each stage read, wrote and measured.

``runs/<name>/manifest.json`` records, per stage, the hash of the config section(s)
it used, fingerprints of its inputs and outputs, its metrics and wall time, and the
versions of chatforge / torch / Python. A stage is *up to date*, and is skipped by
``chatforge pipeline run``, when its config hash and input fingerprints equal the
recorded ones and its outputs are still there, unchanged.

Fingerprints: files inside the run directory (outputs of earlier stages) are hashed
with sha256. External sources can be far larger than RAM, so they are fingerprinted
by path, size and modification time instead of by content; ``--force`` re-runs a
stage regardless.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chatforge
from chatforge.errors import ChatforgeError
from chatforge.io import sha256_file, write_json

MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    """Versions that explain a result: chatforge, torch, Python."""
    out = {"chatforge": chatforge.__version__, "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # torch is a dependency, but the data path does not need it
        out["torch"] = "not installed"
    return out


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path] if path.exists() else []


def fingerprint(paths: Iterable[Path], run_dir: Path) -> dict[str, str]:
    """Map each file (directories are expanded) to a content or metadata fingerprint."""
    out: dict[str, str] = {}
    run_dir = run_dir.resolve()
    for path in paths:
        files = _files_under(path)
        if not files:
            out[str(path)] = "missing"
        for f in files:
            resolved = f.resolve()
            if resolved.is_relative_to(run_dir):
                out[str(f)] = "sha256:" + sha256_file(f)
            else:
                st = f.stat()
                out[str(f)] = f"stat:{st.st_size}:{st.st_mtime_ns}"
    return out


@dataclass
class Stage:
    """One arrow of the pipeline: a function from config + earlier outputs to new outputs."""

    name: str
    sections: tuple[str, ...]  # config sections whose values the stage depends on
    inputs: Callable[[Any], list[Path]]  # what it reads (files or directories)
    outputs: Callable[[Any], list[Path]]  # what it writes
    run: Callable[[Any], dict[str, Any]]  # does the work, returns metrics
    describe: str = ""
    extra_key: Callable[[Any], str] = field(default=lambda cfg: "")  # non-file inputs, e.g. a dataset name


class RunDir:
    """A run directory and its manifest."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST
        self.manifest = self._load()

    def _load(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatforgeError(
                f"{self.manifest_path}: corrupt manifest ({e}); delete it to re-run every stage"
            ) from e
        data.setdefault("stages", {})
        return data

    def config_hash(self, cfg: Any, stage: Stage) -> str:
        import hashlib

        from chatforge.config import to_dict

        d = to_dict(cfg)
        blob = json.dumps({s: d[s] for s in stage.sections} | {"_extra": stage.extra_key(cfg)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def why_stale(self, cfg: Any, stage: Stage) -> str | None:
        """None when the stage is up to date, else the reason it must run."""
        rec = self.manifest["stages"].get(stage.name)
        if rec is None:
            return "never ran"
        if rec.get("config_hash") != self.config_hash(cfg, stage):
            return "config changed"
        if rec.get("inputs") != fingerprint(stage.inputs(cfg), self.path):
            return "inputs changed"
        if rec.get("outputs") != fingerprint(stage.outputs(cfg), self.path):
            return "outputs missing or changed"
        return None

    def record(self, cfg: Any, stage: Stage, metrics: dict[str, Any], wall_time_s: float) -> None:
        from chatforge.config import to_dict

        self.manifest["run"] = self.path.name
        self.manifest["versions"] = versions()
        self.manifest["config"] = to_dict(cfg)
        self.manifest["stages"][stage.name] = {
            "config_hash": self.config_hash(cfg, stage),
            "inputs": fingerprint(stage.inputs(cfg), self.path),
            "outputs": fingerprint(stage.outputs(cfg), self.path),
            "metrics": metrics,
            "wall_time_s": round(wall_time_s, 3),
            "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        write_json(self.manifest_path, self.manifest)


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "skipped"
    reason: str
    wall_time_s: float
    metrics: dict[str, Any]


def run_stages(
    cfg: Any,
    stages: list[Stage],
    force: Iterable[str] = (),
    on_start: Callable[[Stage, str], None] | None = None,
    on_end: Callable[[StageResult], None] | None = None,
) -> list[StageResult]:
    """Run each stage whose config or inputs changed; skip the rest.

    A stage that fails raises; outputs of earlier stages and the manifest entries
    already written stay as they were (every output is written atomically).
    """
    force = set(force)
    known = {s.name for s in stages}
    unknown = force - known - {"all"}
    if unknown:
        raise ChatforgeError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(known)}")
    run_dir = RunDir(cfg.run_dir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        reason = "forced" if ("all" in force or stage.name in force) else run_dir.why_stale(cfg, stage)
        if reason is None:
            rec = run_dir.manifest["stages"][stage.name]
            result = StageResult(stage.name, "skipped", "up to date", 0.0, rec.get("metrics", {}))
        else:
            if on_start:
                on_start(stage, reason)
            t0 = time.perf_counter()
            metrics = stage.run(cfg)
            wall = time.perf_counter() - t0
            run_dir.record(cfg, stage, metrics, wall)
            result = StageResult(stage.name, "ran", reason, wall, metrics)
        results.append(result)
        if on_end:
            on_end(result)
    return results


def relpath(path: Path) -> str:
    """A path as the user would type it from the current directory."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
