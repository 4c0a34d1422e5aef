"""The pipeline: every stage of a run, in order, as ``Stage`` objects.

``chatforge pipeline run CONFIG`` calls ``run_pipeline``; each ``chatforge <stage>``
subcommand runs the same ``Stage`` alone. The data stages are listed here; the
training stages come from their declarations in ``chatforge.stages``. Paths of a
run are defined once, in ``chatforge.paths``.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig
from chatforge.io import read_jsonl, write_json
from chatforge.paths import RunPaths
from chatforge.run import Stage, StageResult, run_stages
from chatforge.stages import TRAINING_STAGES, StageDecl, data_sources, parent_path


def paths(cfg: RunConfig) -> RunPaths:
    return RunPaths(cfg.run_dir)


def _iter_texts(path: Path) -> Iterator[str]:
    for _, row in read_jsonl(path):
        yield row["text"]


# --------------------------------------------------------------------------- stages


def _supportworld(cfg: RunConfig) -> dict[str, Any]:
    from chatforge.data.supportworld import generate

    written = generate(cfg.supportworld, paths(cfg).supportworld)
    return {"files": len(written)}


def _sources(cfg: RunConfig) -> list[str]:
    """The user's sources, or the SupportWorld corpus when none are given."""
    return list(cfg.collect.sources) or [str(paths(cfg).supportworld / "corpus.jsonl")]


def _collect_inputs(cfg: RunConfig) -> list[Path]:
    out: list[Path] = []
    for src in _sources(cfg):
        if src.startswith(("hf:", "http://", "https://")):
            continue  # remote sources: fingerprinted by name only (see extra_key)
        if any(ch in src for ch in "*?["):
            out.extend(Path(m) for m in sorted(glob.glob(src, recursive=True)))
        else:
            out.append(Path(src))
    return out


def _collect(cfg: RunConfig) -> dict[str, Any]:
    from chatforge.data.collect import collect

    return collect(_sources(cfg), paths(cfg).raw, cfg.collect)


def _clean(cfg: RunConfig) -> dict[str, Any]:
    from chatforge.data.clean import clean

    p = paths(cfg)
    report = clean(p.raw, p.clean, p.clean_report, cfg.clean)
    keep = ("input", "output", "wall_time_s", "mb_per_s")
    out = {k: report[k] for k in keep if k in report}
    if report.get("safety"):  # the policy's drops and flags (per category in clean_report.json)
        out["safety_dropped"], out["safety_flagged"] = report["safety"]["dropped"], report["safety"]["flagged"]
    return out


def _clean_inputs(cfg: RunConfig) -> list[Path]:
    """raw.jsonl and the safety policy file (an edited policy re-runs the stage)."""
    if not cfg.clean.safety_policy:
        return [paths(cfg).raw]
    from chatforge.safety.policy import DEFAULT_POLICY, default_policy_path

    policy = cfg.clean.safety_policy
    return [paths(cfg).raw, default_policy_path() if policy == DEFAULT_POLICY else Path(policy)]


def _tokenizer(cfg: RunConfig) -> dict[str, Any]:
    from chatforge.tokenizer import compression_report, train_tokenizer

    p = paths(cfg)
    tok = train_tokenizer(_iter_texts(p.clean), cfg.tokenizer)
    # Compression measured on a sample of the corpus (at most ~2 MB of documents).
    sample = list(itertools.islice(_iter_texts(p.clean), 2000))
    report = compression_report(tok, sample)
    tok.save(p.tokenizer)
    write_json(p.tokenizer_report, report)
    return {"vocab_size": tok.vocab_size, **{k: v for k, v in report.items() if not isinstance(v, dict)}}


def _shard(cfg: RunConfig) -> dict[str, Any]:
    from chatforge.data.shard import shard_corpus
    from chatforge.tokenizer import load_tokenizer

    p = paths(cfg)
    tok = load_tokenizer(p.tokenizer)
    return shard_corpus(p.clean, tok, p.data, cfg.shard)


def data_stages() -> list[Stage]:
    """The data path: SupportWorld -> collect -> clean -> tokenizer -> shards."""
    return [
        Stage("supportworld", ("supportworld",), lambda c: [], lambda c: [paths(c).supportworld],
              _supportworld, "generate the built-in SupportWorld data"),
        Stage("collect", ("collect",), _collect_inputs, lambda c: [paths(c).raw], _collect,
              "gather documents from the sources into data/raw.jsonl",
              extra_key=lambda c: "|".join(_sources(c))),
        Stage("clean", ("clean",), _clean_inputs, lambda c: [paths(c).clean, paths(c).clean_report],
              _clean, "normalise, filter, de-duplicate and scrub PII"),
        Stage("tokenizer", ("tokenizer",), lambda c: [paths(c).clean], lambda c: [paths(c).tokenizer],
              _tokenizer, "train the tokenizer on the clean corpus"),
        Stage("shard", ("shard",), lambda c: [paths(c).clean, paths(c).tokenizer],
              lambda c: [*paths(c).train_shards(), paths(c).val_shard, paths(c).shards_index],
              _shard, "tokenise into train/val shards"),
    ]


def _training_inputs(cfg: RunConfig, decl: StageDecl) -> list[Path]:
    """What a training stage reads: its parent model (or, from scratch, the tokenizer), the shards
    (pre-training data, replay, the forgetting measure) and its data files."""
    p = paths(cfg)
    parent = parent_path(cfg, decl, getattr(cfg, decl.name).init_from)
    start = [parent if parent is not None else p.tokenizer]
    shards = [*p.train_shards(), p.val_shard] if decl.task == "lm" else [p.val_shard]
    files = [Path(s) for s in data_sources(cfg, decl).values() if not s.startswith("hf:")]
    return [*start, *shards, *files]


def training_stage(decl: StageDecl) -> Stage:
    """The pipeline ``Stage`` of a declared training stage."""

    def run(cfg: RunConfig) -> dict[str, Any]:
        from chatforge.train.stage import flat_metrics, run_stage

        return flat_metrics(run_stage(cfg, decl.name))

    sections = ("model", decl.name) if decl.parent is None else (decl.name,)
    return Stage(decl.name, sections, lambda c: _training_inputs(c, decl),
                 lambda c: [paths(c).stage(decl.subdir).model, paths(c).stage(decl.subdir).eval],
                 run, decl.describe)


def model_stages() -> list[Stage]:
    """Training: pre-training, then fine-tuning (and, later, alignment), as declared in ``chatforge.stages``."""
    return [training_stage(d) for d in TRAINING_STAGES if d.in_pipeline]


def _safety_models(cfg: RunConfig, key: str = "redteam_models") -> list[tuple[str, Path]]:
    """``(stage, model dir)`` of the ``safety.<key>`` stages the pipeline trains."""
    from chatforge.stages import get_stage

    return [(name, paths(cfg).stage(get_stage(name).subdir).model) for name in getattr(cfg.safety, key)
            if get_stage(name).in_pipeline]


def _safety_inputs(cfg: RunConfig) -> list[Path]:
    sw = paths(cfg).supportworld / "safety"
    models = dict(_safety_models(cfg)) | dict(_safety_models(cfg, "bias_models"))
    return [paths(cfg).stage("finetune/moderation").model, paths(cfg).stage("finetune/sentiment").model,
            sw / "test.jsonl", sw / "redteam.jsonl", *models.values()]


def _safety_outputs(cfg: RunConfig) -> list[Path]:
    root = paths(cfg).root / "safety"
    return [root / "moderation.json", *(root / f"redteam-{name}.json" for name, _ in _safety_models(cfg))]


def _safety(cfg: RunConfig) -> dict[str, Any]:
    """Moderation precision/recall per category, each chat model's red-team unsafe-answer rate, and the
    bias probes of the base, chat and aligned models."""
    from chatforge.safety.pipeline import evaluate_safety

    return evaluate_safety(cfg, paths(cfg), _safety_models(cfg), _safety_models(cfg, "bias_models"))


def safety_stage() -> Stage:
    return Stage("safety", ("safety", "supportworld"), _safety_inputs, _safety_outputs, _safety,
                 "moderation precision/recall and the red-team unsafe-answer rate, raw and guarded")


def all_stages() -> list[Stage]:
    """Every stage the pipeline knows, in order."""
    return data_stages() + model_stages() + [safety_stage()]


def run_pipeline(cfg: RunConfig, only: list[str] | None = None, force: list[str] = (), **hooks: Any
                 ) -> list[StageResult]:
    """Run the stages named in ``only`` (default: all) that are out of date."""
    stages = all_stages()
    if only:
        stages = [s for s in stages if s.name in only]
    return run_stages(cfg, stages, force=force, **hooks)
