"""What a report card shows, read from a run's files into plain data (no rendering here).

Main sources, per training stage directory (``chatforge.paths``): ``eval.json`` (the stage
harness's schema, ``chatforge.train.stage``), ``metrics.jsonl`` (``kind`` "train"/"eval"
lines), ``answers.jsonl`` (chat stages' held-out answers), ``model/config.json`` and
``versions/<v>/config.json`` (the lineage links), and the run's ``manifest.json``.

A parent's figure is put beside a stage's only where the two were measured on the same
thing, because a perplexity on chat data beside one on pre-training data says nothing:

1. ``X_before`` / ``X_after`` in the stage's own metrics (the forgetting measure: the parent
   and the new model on the same held-out pre-training tokens) -> row ``X``, parent = before;
2. ``details.parent_checks`` (the parent's checks on the very prompts this stage answered);
3. a metric of the same name in the parent's ``eval.json``, when that file is of the parent
   version this stage started from and either both stages answered the same held-out
   prompts (``answers.jsonl`` ``where`` sets equal: the generation metrics) or the split the
   metric is named after (``val_``/``test_``) has the same data fingerprint.

Better/worse comes from ``chatforge.train.stage.metric_goal``; counts (``NEUTRAL``) only get
the direction of the change.

The optional sections (human evaluation, registry, safety) and their data contracts are in
``chatforge.report.sections``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.errors import DataError
from chatforge.paths import MODEL, VERSIONS, RunPaths, stage_of_model_dir
from chatforge.stages import TRAINING_STAGES

# metrics that count things: shown with the direction of a change, never as better or worse
NEUTRAL_SUFFIXES = ("generated", "checked", "_pairs", "_tokens", "_judged", "_length", "_examples", "_n")
SAMPLE_PROMPTS = 6  # held-out prompts shown side by side


class ReportError(DataError):
    """A file the report reads is missing or malformed (the message names it)."""


def metric_direction(name: str) -> str | None:
    """"max", "min", or None for a count (``NEUTRAL_SUFFIXES``)."""
    from chatforge.train.stage import metric_goal

    if name.endswith(NEUTRAL_SUFFIXES):
        return None
    return metric_goal(name)


def verdict(name: str, value: Any, parent: Any) -> str | None:
    """"better", "worse", "same", "changed" (a count) or None when the two cannot be compared."""
    if not is_number(value) or not is_number(parent):
        return None
    if value == parent:
        return "same"
    goal = metric_direction(name)
    if goal is None:
        return "changed"
    return "better" if (value > parent) == (goal == "max") else "worse"


def is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# --------------------------------------------------------------------------- data


@dataclass
class MetricRow:
    name: str
    value: float | int | None
    parent: float | int | None = None  # the parent's figure on the same thing, when there is one
    parent_source: str = ""  # where the parent figure comes from (shown in a footnote)

    @property
    def verdict(self) -> str | None:
        return verdict(self.name, self.value, self.parent)


@dataclass
class StageReport:
    name: str  # the stage ("sft")
    subdir: str  # its directory under the run ("finetune/sft")
    task: str
    version: str
    parent: dict[str, Any] | None  # {"stage", "version", "path"}
    primary: dict[str, Any]
    rows: list[MetricRow]
    train: dict[str, Any]
    wall_time_s: float | None
    created_at: str
    data: dict[str, Any]
    train_curve: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl "train" lines
    eval_curve: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl "eval" lines
    answers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def row(self, name: str) -> MetricRow | None:
        return next((r for r in self.rows if r.name == name), None)


@dataclass
class Side:
    """One side of a ``--compare``: a run (all its stages) or one model (its stage)."""

    label: str
    stages: list[StageReport]


@dataclass
class ReportData:
    title: str
    run: str | None  # the run's directory, when the report is of one
    lineage: list[list[dict[str, Any]]]  # chains, root first: [{"stage", "version", "path", "current"}]
    stages: list[StageReport]
    answer_groups: list[dict[str, Any]]  # {"stages": [names], "prompts": [{"where", "prompt", "reference", "answers"}]}
    compare: tuple[Side, Side] | None = None
    human: dict[str, Any] | None = None
    registry: dict[str, Any] | None = None
    safety: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""


# --------------------------------------------------------------------------- reading files


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ReportError(f"{path}: no {what}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: malformed {what} ({e})") from e
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: malformed {what} (expected a JSON object, got {type(obj).__name__})")
    return obj


def read_jsonl_file(path: Path, what: str) -> list[dict[str, Any]]:
    """The objects of a JSONL file ([] when it does not exist); a bad line is an error naming it."""
    if not Path(path).is_file():
        return []
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{i}: malformed {what} line ({e})") from e
        if not isinstance(obj, dict):
            raise ReportError(f"{path}:{i}: malformed {what} line (expected a JSON object)")
        rows.append(obj)
    return rows


def read_eval(path: Path) -> dict[str, Any]:
    """A stage's ``eval.json``, checked for the fields the report uses."""
    ev = read_json_file(path, "eval.json (a stage's results)")
    for key, kind in (("stage", str), ("version", str), ("primary", dict), ("metrics", dict)):
        if not isinstance(ev.get(key), kind):
            raise ReportError(f"{path}: malformed eval.json: field {key!r} is missing or not a {kind.__name__} "
                              "(re-run the stage with --force to rewrite it)")
    primary = ev["primary"]
    if not isinstance(primary.get("name"), str):
        raise ReportError(f"{path}: malformed eval.json: field 'primary.name' is missing")
    return ev


# --------------------------------------------------------------------------- one stage


def _stage_name(subdir: str) -> str:
    for decl in TRAINING_STAGES:
        if decl.subdir == subdir:
            return decl.name
    return Path(subdir).name


def _stage_dirs(run: RunPaths) -> list[str]:
    """Subdirs of the run's training stages that have an eval.json, in declaration order, then others."""
    known = [d.subdir for d in TRAINING_STAGES if run.stage(d.subdir).eval.is_file()]
    others = sorted(p.parent.relative_to(run.root).as_posix() for p in run.root.glob("**/eval.json")
                    if VERSIONS not in p.parts and "ckpt" not in p.parts and "report" not in p.parts)
    return known + [o for o in others if o not in known]


def _where_set(rows: list[dict[str, Any]]) -> set[str]:
    return {r["where"] for r in rows if isinstance(r.get("where"), str) and isinstance(r.get("answer"), str)}


def _parent_eval(run: RunPaths, ev: dict[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
    """``(parent eval.json, its stage subdir, note)``: None (with why) when it is not of the parent version."""
    parent = ev.get("parent")
    if not isinstance(parent, dict) or not parent.get("path"):
        return None, "", ""
    path = Path(parent["path"])
    parts = path.parts
    if VERSIONS in parts:
        subdir = Path(*parts[:parts.index(VERSIONS)]).as_posix()
    elif parts and parts[-1] == MODEL:
        subdir = Path(*parts[:-1]).as_posix()
    else:
        return None, "", f"parent {parent['path']} is outside the run: no parent figures"
    eval_path = run.stage(subdir).eval
    if not eval_path.is_file():
        return None, subdir, f"parent {subdir} has no eval.json: no parent figures"
    pev = read_eval(eval_path)
    if pev["version"] != parent.get("version"):
        return None, subdir, (f"parent {subdir} was retrained since (its eval.json is of {pev['version']}, this "
                              f"stage started from {parent.get('version')}): no parent figures")
    return pev, subdir, ""


def stage_report(run: RunPaths, subdir: str) -> StageReport:
    """One stage of ``run``: its metrics beside its parent's (module docstring), curves and answers."""
    sp = run.stage(subdir)
    ev = read_eval(sp.eval)
    metrics = {k: v for k, v in ev["metrics"].items() if is_number(v)}
    details = ev.get("details") if isinstance(ev.get("details"), dict) else {}
    answers = read_jsonl_file(sp.answers, "answers.jsonl")
    pev, parent_subdir, note = _parent_eval(run, ev)
    notes = [note] if note else []
    parent_label = (ev.get("parent") or {}).get("stage") or parent_subdir or "parent"

    primary_name = ev["primary"]["name"]
    # the stage's own before/after pairs become one row each
    paired: dict[str, tuple[float, float]] = {}
    for k in metrics:
        if k.endswith("_before") and f"{k[:-7]}_after" in metrics:
            paired[k[:-7]] = (metrics[k], metrics[f"{k[:-7]}_after"])
    # the parent's figure measured by this stage's own test (``test_parent_answer_tokens``) goes beside its own
    for k in metrics:
        if "_parent_" in k and k.replace("_parent_", "_", 1) in metrics:
            paired[k.replace("_parent_", "_", 1)] = (metrics[k], metrics[k.replace("_parent_", "_", 1)])
    skip = {f"{b}_{s}" for b in paired for s in ("before", "after")}
    skip |= {k for k in metrics if "_parent_" in k and k.replace("_parent_", "_", 1) in paired}
    rows: list[MetricRow] = []
    order = [primary_name, *[k for k in metrics if k != primary_name]]
    same_prompts = False
    if pev is not None and answers:
        theirs = read_jsonl_file(run.stage(parent_subdir).answers, "answers.jsonl")
        same_prompts = bool(_where_set(answers)) and _where_set(answers) == _where_set(theirs)
    parent_checks = details.get("parent_checks") if isinstance(details.get("parent_checks"), dict) else {}
    data, pdata = ev.get("data") or {}, (pev or {}).get("data") or {}
    for k in order:
        if k in skip or k not in metrics:
            continue
        row = MetricRow(k, metrics[k])
        if is_number(parent_checks.get(k)):
            row.parent, row.parent_source = parent_checks[k], f"{parent_label}'s answers to the same prompts"
        elif pev is not None and is_number(pev["metrics"].get(k)):
            split = k.split("_", 1)[0]
            same_data = (split in ("val", "test") and isinstance(data.get(split), dict)
                         and data[split].get("fingerprint") is not None
                         and data[split].get("fingerprint") == (pdata.get(split) or {}).get("fingerprint"))
            if same_data or (same_prompts and k.startswith("test_")) or (same_prompts and k == "generated"):
                row.parent = pev["metrics"][k]
                row.parent_source = f"{parent_label}'s eval.json, same " + ("data" if same_data else "prompts")
        rows.append(row)
    for base, (before, after) in paired.items():
        if base in metrics:  # X and X_parent: the parent's answers to the same prompts, measured here
            row = next(r for r in rows if r.name == base)
            row.parent, row.parent_source = before, f"{parent_label}'s answers to the same prompts"
        else:
            rows.append(MetricRow(base, after, before, f"{parent_label} before training, same held-out data"))

    log = read_jsonl_file(sp.metrics, "metrics.jsonl")
    return StageReport(
        name=ev["stage"] if isinstance(ev.get("stage"), str) else _stage_name(subdir), subdir=subdir,
        task=str(ev.get("task", "")), version=ev["version"], parent=ev.get("parent"), primary=ev["primary"],
        rows=rows, train=ev.get("train") if isinstance(ev.get("train"), dict) else {},
        wall_time_s=ev.get("wall_time_s"), created_at=str(ev.get("created_at", "")),
        data=data if isinstance(data, dict) else {},
        train_curve=[r for r in log if r.get("kind", "train") == "train" and is_number(r.get("step"))],
        eval_curve=[r for r in log if r.get("kind") == "eval" and is_number(r.get("step"))],
        answers=answers, notes=notes)


# --------------------------------------------------------------------------- lineage


def _model_config(path: Path) -> dict[str, Any] | None:
    config = path / "config.json"
    return read_json_file(config, "model config.json") if config.is_file() else None


def _find_version(run: RunPaths, recorded: str, version: str | None) -> tuple[Path, bool] | None:
    """The directory of ``version`` of the model recorded at ``recorded`` (relative to the run), and whether it
    is still the stage's newest model."""
    path = run.root / recorded
    config = _model_config(path)
    if config is not None and (version is None or config.get("version") == version):
        return path, path.name == MODEL
    stage_dir = path.parent.parent if path.parent.name == VERSIONS else path.parent
    if version and (stage_dir / VERSIONS / version / "config.json").is_file():
        return stage_dir / VERSIONS / version, False
    return None


def lineage_chain(run: RunPaths, model_dir: Path) -> list[dict[str, Any]]:
    """Root first: every model from pre-training to ``model_dir``, following config.json ``parent`` links."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: Path | None = model_dir
    is_current = model_dir.name == MODEL
    while current is not None:
        config = _model_config(current)
        if config is None:
            break
        rel = current.resolve().relative_to(run.root.resolve()).as_posix() \
            if current.resolve().is_relative_to(run.root.resolve()) else str(current)
        version = str(config.get("version", "?"))
        if version in seen:  # a cycle would be a corrupt file; stop rather than loop
            break
        seen.add(version)
        chain.append({"stage": config.get("stage") or Path(rel).parent.name, "version": version, "path": rel,
                      "current": is_current})
        parent = config.get("parent")
        if not isinstance(parent, dict) or not parent.get("path"):
            break
        found = _find_version(run, parent["path"], parent.get("version"))
        if found is None:
            chain.append({"stage": parent.get("stage") or "?", "version": parent.get("version") or "?",
                          "path": parent["path"], "current": False, "missing": True})
            break
        current, is_current = found
    return chain[::-1]


def run_lineage(run: RunPaths, stages: list[StageReport]) -> list[list[dict[str, Any]]]:
    """One chain per leaf stage (a stage no other stage of the report started from), longest first."""
    parents = {(s.parent or {}).get("path") for s in stages}
    leaves = [s for s in stages if f"{s.subdir}/{MODEL}" not in parents]
    chains = [lineage_chain(run, run.stage(s.subdir).model) for s in leaves if run.stage(s.subdir).model.is_dir()]
    return sorted((c for c in chains if c), key=lambda c: (-len(c), c[-1]["stage"]))


# --------------------------------------------------------------------------- sample answers


def answer_groups(stages: list[StageReport], limit: int = SAMPLE_PROMPTS) -> list[dict[str, Any]]:
    """Stages that answered the same held-out prompts, grouped, with the first ``limit`` shared prompts."""
    groups: list[dict[str, Any]] = []
    for s in stages:
        wheres = _where_set(s.answers)
        if not wheres:
            continue
        group = next((g for g in groups if g["wheres"] & wheres), None)
        if group is None:
            groups.append({"stages": [s], "wheres": set(wheres)})
        else:
            group["stages"].append(s)
            group["wheres"] &= wheres
    out = []
    for g in groups:
        first = g["stages"][0]
        prompts = []
        for row in first.answers:
            if row.get("where") not in g["wheres"]:
                continue
            by_stage = {s.name: next(r for r in s.answers if r.get("where") == row["where"]) for s in g["stages"]}
            prompts.append({"where": row["where"], "prompt": row.get("prompt"), "reference": row.get("reference"),
                            "answers": {name: {"answer": r.get("answer"), "checks": r.get("checks")}
                                        for name, r in by_stage.items()}})
            if len(prompts) == limit:
                break
        out.append({"stages": [s.name for s in g["stages"]], "prompts": prompts})
    return out


# --------------------------------------------------------------------------- targets


def resolve_target(value: str | Path, runs_dir: str | Path = "runs") -> tuple[RunPaths, Path | None]:
    """``(run, model directory or None)`` for a run directory, a run name under ``runs_dir``, a model
    directory, or ``[RUN:]STAGE[@VERSION]`` / a bare version of a model of a run."""
    text = str(value)
    path = Path(text)
    if path.is_dir():
        found = stage_of_model_dir(path)
        if found is not None:
            return RunPaths(found[0]), path
        if (path / "manifest.json").is_file() or (path / "tokenizer").is_dir() or any(path.glob("*/eval.json")) \
                or any(path.glob("*/*/eval.json")):
            return RunPaths(path), None
        raise ReportError(f"{path}: neither a run directory (manifest.json, tokenizer/, <stage>/eval.json) nor a model "
                          "directory of a run")
    run_name, _, rest = text.rpartition(":")
    if (Path(runs_dir) / text).is_dir():
        return resolve_target(Path(runs_dir) / text, runs_dir)
    run = RunPaths.of(runs_dir, run_name or "default")
    stage, _, version = rest.partition("@")
    names = {d.name: d.subdir for d in TRAINING_STAGES}
    if stage in names and not version:
        model = run.stage(names[stage]).model
        if model.is_dir():
            return run, model
        raise ReportError(f"no {stage} model in run {run.name!r} (expected {model})")
    wanted = version or stage
    for config in sorted(run.root.glob("**/config.json")):
        if config.parent.name != MODEL and config.parent.parent.name != VERSIONS:
            continue
        if "ckpt" in config.parts:
            continue
        cfg = read_json_file(config, "model config.json")
        if cfg.get("version") == wanted and (not version or cfg.get("stage") == stage):
            return run, config.parent
    raise ReportError(f"{text!r} is not a run directory, a run under {runs_dir}, a model directory, a stage or a "
                      f"model version of run {run.name!r}")


def _side(run: RunPaths, model: Path | None) -> Side:
    if model is None:
        return Side(run.name, [stage_report(run, s) for s in _stage_dirs(run)])
    rel = model.resolve().relative_to(run.root.resolve()).parts
    subdir = Path(*rel[:-2 if VERSIONS in rel else -1]).as_posix()
    report = stage_report(run, subdir)
    config = _model_config(model) or {}
    if config.get("version") != report.version:
        report = _registered_report(run, subdir, config.get("version"))
        if report is None:
            raise ReportError(f"{run.stage(subdir).eval} is of {report_version(run, subdir)}, not of {model} "
                              f"({config.get('version')}): its stage was retrained, so its figures are gone")
    return Side(f"{run.name}/{report.label}", [report])


def report_version(run: RunPaths, subdir: str) -> str:
    return str(read_eval(run.stage(subdir).eval).get("version"))


def _registered_report(run: RunPaths, subdir: str, version: str | None) -> StageReport | None:
    """An older version's figures from the model registry (its stage's eval.json now holds a newer model's):
    the metrics recorded when it was saved, without curves or answers."""
    from chatforge.registry import Registry, RegistryError

    try:
        v = Registry(run.root.parent).get(version or "")
    except RegistryError:
        return None
    rec = v.record
    primary = rec.get("primary") or {"name": "", "value": None, "goal": "max"}
    rows = [MetricRow(k, x) for k, x in (rec.get("metrics") or {}).items() if is_number(x)]
    rows.sort(key=lambda r: r.name != primary.get("name"))
    return StageReport(
        name=v.stage, subdir=subdir, task=str(rec.get("task") or ""), version=v.version,
        parent={"stage": (rec.get("parent") or {}).get("stage"), "version": v.parent} if v.parent else None,
        primary=primary, rows=rows, train=rec.get("train") or {}, wall_time_s=rec.get("wall_time_s"),
        created_at=v.created_at, data=rec.get("data") or {},
        notes=[f"{v.version}: figures from the model registry (its stage was retrained since; no curves kept)"])


# --------------------------------------------------------------------------- the report


def build_report(run_dir: str | Path | None, compare: tuple[str | Path, str | Path] | None = None,
                 human: dict[str, Any] | None = None, registry: dict[str, Any] | None = None,
                 runs_dir: str | Path = "runs", model: str | Path | None = None) -> ReportData:
    """Everything a report card shows. ``run_dir``: a run (all its stages) or, with ``model`` (or a model
    directory as ``run_dir``), just the stages in that model's lineage; None with ``compare`` for a
    comparison alone. ``compare``: two runs or models (anything ``resolve_target`` takes)."""
    from chatforge.report.sections import safety_results

    if run_dir is None and compare is None:
        raise ReportError("nothing to report: give a run or model, or two to compare")
    stages: list[StageReport] = []
    lineage: list[list[dict[str, Any]]] = []
    run: RunPaths | None = None
    manifest: dict[str, Any] = {}
    title = "comparison"
    if run_dir is not None:
        run, model_dir = resolve_target(model or run_dir, runs_dir) if model else resolve_target(run_dir, runs_dir)
        if not run.root.is_dir():
            raise ReportError(f"{run.root}: no such run directory")
        if run.manifest.is_file():
            manifest = read_json_file(run.manifest, "manifest.json")
        if model_dir is not None:
            lineage = [lineage_chain(run, model_dir)]
            wanted = {Path(n["path"]).parent.as_posix() if Path(n["path"]).name == MODEL
                      else Path(n["path"]).parent.parent.as_posix() for n in lineage[0]}
            stages = [stage_report(run, s) for s in _stage_dirs(run) if s in wanted]
            title = f"{run.name}: {lineage[0][-1]['stage']}@{lineage[0][-1]['version']}"
        else:
            stages = [stage_report(run, s) for s in _stage_dirs(run)]
            if not stages:
                raise ReportError(f"{run.root}: no stage results (no <stage>/eval.json): run the pipeline first")
            lineage = run_lineage(run, stages)
            title = f"run {run.name}"
    sides = None
    if compare is not None:
        a, b = (_side(*resolve_target(x, runs_dir)) for x in compare)
        if a.label == b.label:
            b.label += " (2)"
        sides = (a, b)
        title = f"{title}; {a.label} vs {b.label}" if run_dir is not None else f"{a.label} vs {b.label}"
    return ReportData(
        title=title, run=str(run.root) if run else None, lineage=lineage, stages=stages,
        answer_groups=answer_groups(stages), compare=sides, human=human, registry=registry,
        safety=safety_results(run, stages) if run else [], manifest=manifest,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))


def compare_rows(a: Side, b: Side) -> list[tuple[str, str, list[MetricRow]]]:
    """``(stage of A, stage of B, rows)`` for every stage the two sides share (one model each: that pair);
    a row's ``parent`` is A's figure and ``value`` B's, so its verdict says whether B is better."""
    if len(a.stages) == 1 and len(b.stages) == 1:
        pairs = [(a.stages[0], b.stages[0])]
    else:
        theirs = {s.name: s for s in b.stages}
        pairs = [(s, theirs[s.name]) for s in a.stages if s.name in theirs]
    out = []
    for sa, sb in pairs:
        names = [r.name for r in sa.rows] + [r.name for r in sb.rows if sa.row(r.name) is None]
        rows = []
        for n in names:
            ra, rb = sa.row(n), sb.row(n)
            rows.append(MetricRow(n, rb.value if rb else None, ra.value if ra else None))
        out.append((sa.label, sb.label, rows))
    return out
