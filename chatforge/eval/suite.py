"""The evaluation suite: one JSON result per model version (``chatforge eval suite``).

``run_suite(model_dir, ...)`` measures, in this order:

1. ``contamination``: held-out items found in the training data (``eval.contamination``):
   the run's pre-training validation documents against its training documents (the split
   ``data shard`` made, recomputed from ``shards.json``'s seed and fraction), SupportWorld's
   held-out support prompts against the training conversations' user turns and the training
   documents, and each task's contexts against the same. With ``exclude`` (the default) the
   contaminated prompts are left out of the steps below that use prompts.
2. ``stage``: the scalar metrics of the stage's ``eval.json`` (not recomputed: some stage
   evaluations are expensive), with ``matches_version`` false when that file describes
   another version of the stage's model.
3. ``perplexity``: held-out loss / perplexity / bits per byte on the run's ``val.bin``
   (the first ``ppl_batches`` batches; cheap).
4. ``checks``: SupportWorld's checks on greedy answers to the first ``limit`` clean held-out
   support prompts (0 = skip).
5. ``tasks``: multiple-choice / loglikelihood task files (``eval.tasks``), scored per choice.
6. ``prompts``: the fixed prompt set, ``n_prompts`` held-out support prompts chosen by a hash
   of their ids (the same prompts for every version of a run), with the model's greedy answers.

Result (JSON-able; ``summary`` is the flat ``name -> number`` view that ``compare`` diffs)::

    {"suite_version": 1, "model": {"path", "version", "stage", "run"}, "created_at",
     "contamination": {...} | null, "stage": {"stage", "version", "matches_version", "primary", "metrics"} | null,
     "perplexity": {...} | null, "checks": {report} | null, "tasks": {name: {...}},
     "prompts": [{"id", "intent", "question", "answer", "ended"}], "summary": {name: number},
     "skipped": {part: why}, "path": where it was written}

Written atomically to ``suite_path(run_dir, version)`` = ``<run>/eval/suite/<version>.json``
(or ``out``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.io import read_jsonl, write_json
from chatforge.paths import RunPaths, stage_of_model_dir

SUITE_VERSION = 1
LIMIT = 32  # held-out support prompts checked
N_PROMPTS = 8  # the fixed prompt set
MAX_NEW_TOKENS = 128
PPL_BATCHES = 16
DEFAULT_TASKS = ("supportworld_mc",)


def suite_path(run_dir: str | Path, version: str) -> Path:
    """Where the suite's result for a model version of a run is kept."""
    return Path(run_dir) / "eval" / "suite" / f"{version}.json"


def _stable_rank(item_id: str) -> str:
    return hashlib.blake2b(item_id.encode(), digest_size=8).hexdigest()


def _split_docs(run: RunPaths) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train docs, val docs) of the run's clean.jsonl, split as ``data shard`` split them."""
    from chatforge.data.shard import split_score

    if not run.clean.is_file() or not run.shards_index.is_file():
        return [], []
    summary = json.loads(run.shards_index.read_text(encoding="utf-8"))
    seed, frac = summary.get("seed"), summary.get("val_fraction")
    if not isinstance(seed, int) or not isinstance(frac, (int, float)):
        raise ChatforgeError(f"{run.shards_index}: no seed / val_fraction to recompute the split from")
    train, val = [], []
    for lineno, obj in read_jsonl(run.clean):
        text = obj.get("text")
        if not isinstance(text, str):
            continue
        doc_id = str(obj["id"]) if "id" in obj else "text:" + hashlib.sha256(text.encode()).hexdigest()
        (val if split_score(seed, doc_id) < frac else train).append((f"{run.clean.name}:{lineno}", text))
    return train, val


def _user_turns(path: Path) -> Iterator[tuple[str, str]]:
    for lineno, row in read_jsonl(path):
        for k, m in enumerate(row.get("messages") or []):
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                yield f"{path.name}:{lineno}:{k}", m["content"]


def _heldout_prompts(run: RunPaths) -> list[dict[str, Any]]:
    from chatforge.eval.checks import support_rows

    path = run.supportworld / "conversations" / "test.jsonl"
    return support_rows(path) if path.is_file() else []


def _question(row: dict[str, Any]) -> str:
    from chatforge.eval.checks import support_prompt

    prompt = support_prompt(row)
    assert prompt is not None
    return str(prompt[0][-1]["content"])


def _scalars(d: Any) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _stage_eval(model_dir: Path, version: str, found: tuple[Path, str] | None) -> dict[str, Any] | None:
    from chatforge.paths import StagePaths

    if found is None:
        return None
    path = StagePaths(found[0] / found[1]).eval
    if not path.is_file():
        return None
    ev = json.loads(path.read_text(encoding="utf-8"))
    return {"stage": ev.get("stage"), "version": ev.get("version"), "matches_version": ev.get("version") == version,
            "primary": ev.get("primary"), "metrics": _scalars(ev.get("metrics"))}


def run_suite(model_dir: str | Path, tasks: Sequence[str | Path] | None = None, *, limit: int = LIMIT,
              n_prompts: int = N_PROMPTS, max_new_tokens: int = MAX_NEW_TOKENS, ppl_batches: int = PPL_BATCHES,
              exclude: bool = True, task_bos: bool = False, device: str = "auto", dtype: str = "auto",
              out: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate the model in ``model_dir`` (see the module docstring); returns the result and, with
    ``write``, stores it at ``out`` or ``suite_path(<its run>, <version>)``.

    ``tasks``: task files or packaged task names (None = ``DEFAULT_TASKS``; ``[]`` = none).
    ``limit``: held-out prompts checked (0 = skip the checks); ``n_prompts``: size of the fixed set.
    ``task_bos``: condition task scores on BOS (see ``eval.tasks``; False matches lm-eval)."""
    from chatforge.device import resolve_device, resolve_precision
    from chatforge.eval import contamination as cont
    from chatforge.eval.tasks import evaluate_task, load_task
    from chatforge.train.checkpoint import load_model, model_version

    model_dir = Path(model_dir)
    version = model_version(model_dir)
    found = stage_of_model_dir(model_dir)
    run = RunPaths(found[0]) if found else None
    if write and out is None and run is None:
        raise ChatforgeError(f"{model_dir} is not a model of a run (runs/<run>/<stage>/model): give an output "
                             "file (--out)")
    dev = resolve_device(device)
    model, tok, meta = load_model(model_dir, dev)
    precision = resolve_precision(dtype, dev)
    skipped: dict[str, str] = {}
    result: dict[str, Any] = {
        "suite_version": SUITE_VERSION,
        "model": {"path": str(model_dir), "version": version, "stage": found[1] if found else meta.get("stage"),
                  "run": str(run.root) if run else None},
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    loaded = [load_task(t) for t in (DEFAULT_TASKS if tasks is None else tasks)]
    rows = _heldout_prompts(run) if run else []

    # 1. contamination
    train_docs, val_docs = _split_docs(run) if run else ([], [])
    train_conv = run.supportworld / "conversations" / "train.jsonl" if run else None
    train_texts = list(train_docs)
    if train_conv is not None and train_conv.is_file():
        train_texts += list(_user_turns(train_conv))
    if train_texts:
        sets: dict[str, list[tuple[str, str]]] = {}
        if val_docs:
            sets["texts"] = val_docs
        if rows:
            sets["prompts"] = [(str(r.get("id", k)), _question(r)) for k, r in enumerate(rows)]
        for t in loaded:
            sets[f"task:{t.name}"] = [(ex.id, ex.context) for ex in t.examples]
        report, verdicts = cont.check(sets, train_texts)
        report["excluded"] = exclude
        result["contamination"] = report
        if exclude and rows:
            rows = cont.exclude(rows, verdicts["prompts"])
    else:
        result["contamination"] = None
        skipped["contamination"] = "no training data found beside the model (not in a run)"

    # 2. the stage's own held-out metrics
    result["stage"] = _stage_eval(model_dir, version, found)
    if result["stage"] is None:
        skipped["stage"] = "no eval.json for the model's stage"

    with precision.autocast():
        # 3. perplexity on the run's validation shard
        if run and run.val_shard.is_file():
            from chatforge.eval.lm import perplexity

            result["perplexity"] = perplexity(model, tok, shards=[str(run.val_shard)], max_batches=ppl_batches,
                                              device=dev)
        else:
            result["perplexity"] = None
            skipped["perplexity"] = "no validation shard (data/val.bin)"

        # 4. SupportWorld checks on held-out prompts
        result["checks"] = None
        if limit and rows:
            from chatforge.eval.checks import SupportChecks, evaluate_checks

            assert run is not None
            checks = SupportChecks.for_data(run.supportworld / "conversations" / "test.jsonl")
            report, _ = evaluate_checks(model, tok, rows[:limit], checks, max_new_tokens, dev)
            result["checks"] = report
        elif limit:
            skipped["checks"] = "no held-out SupportWorld conversations in the run"

    # 5. task files (fp32 unless asked: the scores are compared with other scorers')
    result["tasks"] = {}
    for t in loaded:
        res = evaluate_task(model, tok, t, dev, bos=task_bos)
        result["tasks"][t.name] = res

    # 6. the fixed prompt set
    result["prompts"] = []
    if n_prompts and rows:
        from chatforge.eval.checks import support_prompt
        from chatforge.eval.generation import answer_prompts

        fixed = sorted(rows, key=lambda r: _stable_rank(str(r.get("id"))))[:n_prompts]
        with precision.autocast():
            answers = answer_prompts(model, tok, [(str(r.get("id")), support_prompt(r)[0]) for r in fixed],
                                     max_new_tokens, dev)
        for r, a in zip(fixed, answers):
            result["prompts"].append({"id": r.get("id"), "intent": r.get("intent"), "question": _question(r),
                                      "answer": a.text if a else None, "ended": a.ended if a else None})
    result["summary"] = summarize(result)
    result["skipped"] = skipped
    if write:
        path = Path(out) if out is not None else suite_path(run.root, version)  # type: ignore[union-attr]
        result["path"] = str(path)
        if run is not None:
            _keep_in_registry(run.root.parent, version, result)
        write_json(path, result)
    return result


def _keep_in_registry(runs_dir: Path, version: str, result: dict[str, Any]) -> None:
    """Store the result with the version in the registry (when the version is registered there)."""
    from chatforge.registry import Registry, RegistryError

    reg = Registry(runs_dir)
    try:
        reg.get(version)
    except RegistryError:
        return  # a model saved before the registry existed, or copied in by hand: the file is its record
    result["registry_eval"] = str(reg.add_eval(version, "suite", result))


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """The result's numbers as one flat ``name -> value`` map (what ``compare`` diffs)."""
    out: dict[str, float] = {}
    if result.get("stage"):
        out.update({f"stage.{k}": v for k, v in result["stage"]["metrics"].items()})
    out.update({f"perplexity.{k}": v for k, v in _scalars(result.get("perplexity")).items()})
    if result.get("checks"):
        for name, tally in result["checks"]["checks"].items():
            if tally.get("rate") is not None:
                out[f"checks.{name}"] = float(tally["rate"])
    for name, t in result.get("tasks", {}).items():
        out.update({f"tasks.{name}.{k}": v for k, v in _scalars(t["metrics"]).items()})
    if result.get("contamination"):
        for name, s in result["contamination"]["sets"].items():
            out[f"contamination.{name}.rate"] = float(s["rate"])
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per summary number: ``{"model", "against", "delta"}`` (delta = model - against; None if one lacks it)."""
    sa, sb = a["summary"], b["summary"]
    return {k: {"model": sa.get(k), "against": sb.get(k),
                "delta": sa[k] - sb[k] if k in sa and k in sb else None} for k in sorted({*sa, *sb})}


def format_result(result: dict[str, Any], against: dict[str, Any] | None = None) -> str:
    """A plain-text report; with ``against``, the deltas."""
    m = result["model"]
    lines = [f"model {m['path']} version {m['version']} (stage {m['stage']})"]
    c = result.get("contamination")
    if c:
        for name, s in c["sets"].items():
            lines.append(f"contamination {name}: {s['contaminated']}/{s['n']} ({s['rate']:.1%}) "
                         f"exact {s['exact']} near {s['near']} contained {s['contained']}"
                         + (" -> excluded" if c.get("excluded") and name == "prompts" and s["contaminated"] else ""))
    if against is None:
        for k, v in result["summary"].items():
            lines.append(f"{k:40s} {v:.4f}")
    else:
        lines.append(f"against {against['model']['path']} version {against['model']['version']}")
        lines.append(f"{'metric':40s} {'model':>10s} {'against':>10s} {'delta':>10s}")
        for k, d in compare(result, against).items():
            def cell(x: float | None) -> str:
                return f"{x:10.4f}" if x is not None else f"{'-':>10s}"
            lines.append(f"{k:40s} {cell(d['model'])} {cell(d['against'])} {cell(d['delta'])}")
    for p in result.get("prompts", []):
        lines.append(f"prompt {p['id']}: {p['question'][:60]!r} -> {str(p['answer'])[:80]!r}")
    if result.get("path"):
        lines.append(f"written to {result['path']}")
    return "\n".join(lines)
