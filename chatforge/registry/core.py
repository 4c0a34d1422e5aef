"""The model registry: every saved model is an immutable version; aliases move, and every move is kept.

Layout (one registry per runs directory, beside the runs: ``runs/registry/``)::

    versions/<version>.json     one record per model version, written once, never rewritten
    evals/<version>/<kind>-<time>.json   evaluation results added later (``eval suite``, rounds)
    log.jsonl                   append-only: alias moves, promotion decisions, deletions

A version is the model's content address: the first 12 hex digits of its weights'
sha256 (what ``config.json`` records as ``version``). Its record holds what explains it:
the run (the registered model's *name*), stage and task, the parent version, the data
fingerprints, the stage's config section, the code versions, the metrics, wall time and
when it was created. The model's files stay where the stage wrote them: a record names
the stage directory, and the version is found under ``model/`` (the newest) or
``versions/<version>/`` (an older one; stages move, never overwrite, see
``train.stage.save_versioned``).

Aliases are MLflow's idea: a movable name per registered model (``@champion`` is what
``serve`` serves, ``@challenger`` what a round tests, any other is the user's own). The
current alias table is the replay of ``log.jsonl``, so "which version was ``@champion``
at time T" is answered by replaying up to T. The log is only ever appended to (under a
file lock, each line fsynced), never rewritten.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import getpass
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.io import sha256_file, write_json

REGISTRY_DIR = "registry"
CHAMPION, CHALLENGER = "champion", "challenger"
VERSION_RE = re.compile(r"^[0-9a-f]{4,64}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
WEIGHTS = "model.safetensors"


class RegistryError(ChatforgeError):
    """A registry operation that cannot be done (unknown version, alias, refused delete)."""


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def parse_time(text: str) -> _dt.datetime:
    """An ISO date or date-time (a date means its end, UTC when no zone is given)."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            t = _dt.datetime.fromisoformat(text) + _dt.timedelta(days=1) - _dt.timedelta(microseconds=1)
        else:
            t = _dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise RegistryError(f"{text!r} is not an ISO date or date-time (e.g. 2026-12-01 or "
                            "2026-12-01T14:30)") from e
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return os.environ.get("USER", "unknown")


@dataclass(frozen=True)
class Version:
    """One registered model version (the record under ``versions/<version>.json``)."""

    record: dict[str, Any]

    @property
    def version(self) -> str:
        return self.record["version"]

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def stage(self) -> str:
        return self.record.get("stage") or "?"

    @property
    def parent(self) -> str | None:
        return (self.record.get("parent") or {}).get("version")

    @property
    def created_at(self) -> str:
        return self.record.get("created_at", "")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics") or {}

    @property
    def primary(self) -> dict[str, Any] | None:
        return self.record.get("primary")


class Registry:
    """The registry of one runs directory (``runs/registry/``)."""

    def __init__(self, runs_dir: str | Path = "runs") -> None:
        self.runs_dir = Path(runs_dir)
        self.root = self.runs_dir / REGISTRY_DIR
        self.versions_dir = self.root / "versions"
        self.evals_dir = self.root / "evals"
        self.log_path = self.root / "log.jsonl"

    # ----------------------------------------------------------------- writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two stages or two `models` commands at once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append one event to the log (the caller holds the lock). A line is written whole and fsynced,
        so a crash leaves at most a torn last line, which reading skips with a warning."""
        event = {"at": now(), "by": user(), **event}
        line = json.dumps(event, sort_keys=True) + "\n"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return event

    def register(self, record: dict[str, Any]) -> Version:
        """Add a version. Its record is written once: registering the same version again (the same
        weights saved again) keeps the first record and returns it."""
        version = record.get("version")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise RegistryError(f"registry: a version must be hex digits, got {version!r}")
        for key in ("name", "stage", "stage_dir"):
            if not record.get(key):
                raise RegistryError(f"registry: record of {version} lacks {key!r}")
        path = self.versions_dir / f"{version}.json"
        with self._locked():
            if path.is_file():
                return self.get(version)
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            write_json(path, {"registered_at": now(), **record})
            self._append({"event": "register", "name": record["name"], "version": version,
                          "stage": record["stage"]})
        return self.get(version)

    def set_alias(self, name: str, alias: str, version: str, why: str = "", by: str | None = None,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Point ``name@alias`` at ``version`` (which must be a version of ``name``); returns the event."""
        check_alias(alias)
        v = self.get(version)
        if v.name != name:
            raise RegistryError(f"version {v.version} belongs to {v.name!r}, not {name!r}")
        with self._locked():
            previous = self.aliases(name).get(alias)
            event: dict[str, Any] = {"event": "alias", "name": name, "alias": alias, "version": v.version,
                                     "previous": previous, "why": why}
            if by:
                event["by"] = by
            if details:
                event["details"] = details
            return self._append(event)

    def remove_alias(self, name: str, alias: str, why: str = "") -> dict[str, Any]:
        with self._locked():
            previous = self.aliases(name).get(alias)
            if previous is None:
                raise RegistryError(f"{name}@{alias} is not set")
            return self._append({"event": "alias", "name": name, "alias": alias, "version": None,
                                 "previous": previous, "why": why})

    def rollback(self, name: str, alias: str = CHAMPION, why: str = "") -> dict[str, Any]:
        """Point ``name@alias`` back at the version it pointed at before its current one."""
        current = self.aliases(name).get(alias)
        if current is None:
            raise RegistryError(f"{name}@{alias} is not set: nothing to roll back")
        # the version it held before the move that gave it its current one
        last_set = [e for e in self.history(name, alias) if e.get("version") == current][-1]
        target = last_set.get("previous")
        if not target:
            raise RegistryError(f"{name}@{alias} held nothing before {current}: nothing to roll back to")
        return self.set_alias(name, alias, target, why=why or f"rollback from {current}")

    def record_decision(self, name: str, decision: dict[str, Any]) -> dict[str, Any]:
        """Append a promotion decision (a round's comparison of challenger and champion)."""
        with self._locked():
            return self._append({"event": "decision", "name": name, **decision})

    def add_eval(self, version: str, kind: str, result: dict[str, Any]) -> Path:
        """Keep an evaluation result with a version (a new file each time: results are never replaced)."""
        v = self.get(version)
        stamp = now().replace(":", "").replace("+0000", "Z")
        path = self.evals_dir / v.version / f"{kind}-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"version": v.version, "kind": kind, "at": now(), "result": result})
        return path

    def delete(self, version: str, why: str = "") -> dict[str, Any]:
        """Delete a version's record and its files. Refused for a version an alias points at, for a stage's
        newest model (``model/``, which the stage's next run would move) and for a prefix or alias: the
        full version must be named."""
        if not VERSION_RE.match(version) or not (self.versions_dir / f"{version}.json").is_file():
            raise RegistryError(f"delete: {version!r} is not a registered version (name it in full, "
                                "as `chatforge models list` shows it)")
        v = self.get(version)
        held = [f"{v.name}@{a}" for a, ver in self.aliases(v.name).items() if ver == version]
        if held:
            raise RegistryError(f"delete: {version} is {', '.join(held)}; move the alias first")
        directory = self.path_of(version, must_exist=False)
        if directory is not None and directory.name == "model":
            raise RegistryError(f"delete: {version} is the newest model of its stage ({directory}); it is kept")
        with self._locked():
            if directory is not None:
                shutil.rmtree(directory)
            (self.versions_dir / f"{version}.json").unlink()
            shutil.rmtree(self.evals_dir / version, ignore_errors=True)
            return self._append({"event": "delete", "name": v.name, "version": version, "why": why,
                                 "path": str(directory) if directory else None})

    # ----------------------------------------------------------------- reading

    def get(self, ref: str) -> Version:
        """A version by its id or a unique prefix of it (4 hex digits at least)."""
        if not VERSION_RE.match(ref or ""):
            raise RegistryError(f"{ref!r} is not a version (hex digits, as `chatforge models list` shows)")
        exact = self.versions_dir / f"{ref}.json"
        if exact.is_file():
            return Version(_read(exact))
        matches = sorted(self.versions_dir.glob(f"{ref}*.json")) if self.versions_dir.is_dir() else []
        if not matches:
            raise RegistryError(f"no version {ref!r} in the registry {self.root}")
        if len(matches) > 1:
            raise RegistryError(f"version prefix {ref!r} is ambiguous: "
                                f"{', '.join(m.stem for m in matches[:5])}")
        return Version(_read(matches[0]))

    def list(self, name: str | None = None, stage: str | None = None) -> list[Version]:
        """Every version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        out = [Version(_read(p)) for p in self.versions_dir.glob("*.json")]
        out = [v for v in out if (name is None or v.name == name) and (stage is None or v.stage == stage)]
        return sorted(out, key=lambda v: (v.record.get("registered_at", ""), v.version))

    def events(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        out = []
        with open(self.log_path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: {self.log_path}:{n}: an unreadable line (a write cut short?) is skipped")
        return out

    def history(self, name: str | None = None, alias: str | None = None) -> list[dict[str, Any]]:
        """Alias moves, oldest first."""
        return [e for e in self.events() if e.get("event") == "alias"
                and (name is None or e["name"] == name) and (alias is None or e["alias"] == alias)]

    def aliases(self, name: str, at: _dt.datetime | None = None) -> dict[str, str]:
        """``alias -> version`` for ``name`` now, or at time ``at`` (the log replayed up to it)."""
        table: dict[str, str] = {}
        for e in self.history(name):
            if at is not None and _dt.datetime.fromisoformat(e["at"]) > at:
                break
            if e.get("version"):
                table[e["alias"]] = e["version"]
            else:
                table.pop(e["alias"], None)
        return table

    def aliases_of(self, version: str) -> list[str]:
        v = self.get(version)
        return sorted(a for a, ver in self.aliases(v.name).items() if ver == v.version)

    def decisions(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "decision" and (name is None or e["name"] == name)]

    def evals(self, version: str) -> list[dict[str, Any]]:
        v = self.get(version)
        folder = self.evals_dir / v.version
        return [_read(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    def path_of(self, version: str, must_exist: bool = True) -> Path | None:
        """Where the version's files are now: its stage's ``model/`` or ``versions/<version>/``."""
        v = self.get(version)
        stage_dir = self.runs_dir / v.record["stage_dir"]
        for candidate in (stage_dir / "model", stage_dir / "versions" / v.version):
            if _version_in(candidate) == v.version:
                return candidate
        if must_exist:
            raise RegistryError(f"version {v.version} ({v.name} {v.stage}) is registered but its files are gone "
                                f"from {stage_dir} (deleted by hand?)")
        return None

    def resolve(self, ref: str, default_name: str | None = None) -> Version:
        """``NAME@ALIAS``, ``@ALIAS`` (in ``default_name``) or a version (prefix)."""
        if "@" in ref:
            name, _, alias = ref.partition("@")
            name = name or default_name
            if not name:
                raise RegistryError(f"{ref!r}: name the model (NAME@{alias})")
            table = self.aliases(name)
            if alias not in table:
                known = ", ".join(f"@{a}" for a in sorted(table)) or "none"
                raise RegistryError(f"{name}@{alias} is not set (aliases of {name}: {known}); "
                                    f"set it with `chatforge models promote` or `chatforge models tag`")
            return self.get(table[alias])
        return self.get(ref)

    def verify(self, version: str) -> bool:
        """Whether the version's weights still hash to what was registered (immutability check)."""
        v = self.get(version)
        path = self.path_of(version)
        return sha256_file(path / WEIGHTS) == v.record.get("weights_sha256")


def registered_model_dir(ref: str, runs_dir: str | Path, name: str) -> Path | None:
    """The files of ``NAME@ALIAS``, ``@ALIAS`` (in run ``name``) or a registered version (prefix); None when
    ``ref`` is an existing path or looks like neither, so callers treat it as they did before the registry."""
    if Path(ref).exists() or ("@" not in ref and not VERSION_RE.match(ref)):
        return None
    reg = Registry(runs_dir)
    if "@" not in ref and not any(v.version.startswith(ref) for v in reg.list()):
        return None
    return reg.path_of(reg.resolve(ref, name).version)


def check_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias or ""):
        raise RegistryError(f"alias {alias!r}: letters, digits, '_', '.', '-', starting with a letter")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: unreadable registry file: {e}") from e


def _version_in(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("version")
    except (OSError, json.JSONDecodeError):
        return None


def code_version() -> dict[str, str]:
    """``chatforge.run.versions()`` (chatforge, torch, Python) and the git commit when chatforge runs from a
    checkout."""
    import subprocess

    import chatforge
    from chatforge.run import versions

    out = versions()
    source = Path(chatforge.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package, or no git: the package version says it
    return out


def stage_record(runs_dir: Path, run_name: str, model_dir: Path, ev: dict[str, Any],
                 config: dict[str, Any]) -> dict[str, Any]:
    """The registry record of a model a training stage just saved, from its ``eval.json`` and config."""
    model_dir = Path(model_dir)
    stage_dir = model_dir.parent if model_dir.name == "model" else model_dir.parent.parent
    parent = ev.get("parent")
    return {
        "version": ev["version"], "name": run_name, "stage": ev["stage"], "task": ev.get("task"),
        "stage_dir": os.path.relpath(stage_dir, runs_dir),
        "parent": {"version": parent["version"], "stage": parent.get("stage")} if parent else None,
        "weights_sha256": sha256_file(model_dir / WEIGHTS),
        "data": ev.get("data"), "config": config, "code": code_version(),
        "primary": ev.get("primary"), "metrics": ev.get("metrics"), "train": ev.get("train"),
        "wall_time_s": ev.get("wall_time_s"), "created_at": ev.get("created_at"),
    }
