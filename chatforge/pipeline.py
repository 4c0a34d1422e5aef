"""The pipeline: every stage of a run, in order, as ``Stage`` objects.

``chatforge pipeline run CONFIG`` calls ``run_pipeline``; each ``chatforge <stage>``
subcommand runs the same ``Stage`` alone. Paths of a run (all under
``runs/<name>/``) are defined once here, in ``RunPaths``.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig
from chatforge.io import read_jsonl, write_json
from chatforge.run import Stage, StageResult, run_stages


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of a run writes."""

    root: Path

    @property
    def supportworld(self) -> Path:
        return self.root / "supportworld"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        return self.data / "raw.jsonl"

    @property
    def clean(self) -> Path:
        return self.data / "clean.jsonl"

    @property
    def clean_report(self) -> Path:
        return self.data / "clean_report.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_report(self) -> Path:
        return self.tokenizer / "compression.json"

    @property
    def shards_index(self) -> Path:
        return self.data / "shards.json"

    def train_shards(self) -> list[Path]:
        # numeric order: train_1000.bin comes after train_999.bin
        return sorted(self.data.glob("train_*.bin"), key=lambda p: (len(p.stem), p.stem))

    @property
    def val_shard(self) -> Path:
        return self.data / "val.bin"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"


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
    return {k: report[k] for k in keep if k in report}


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
        Stage("clean", ("clean",), lambda c: [paths(c).raw], lambda c: [paths(c).clean, paths(c).clean_report],
              _clean, "normalise, filter, de-duplicate and scrub PII"),
        Stage("tokenizer", ("tokenizer",), lambda c: [paths(c).clean], lambda c: [paths(c).tokenizer],
              _tokenizer, "train the tokenizer on the clean corpus"),
        Stage("shard", ("shard",), lambda c: [paths(c).clean, paths(c).tokenizer],
              lambda c: [*paths(c).train_shards(), paths(c).val_shard, paths(c).shards_index],
              _shard, "tokenise into train/val shards"),
    ]


def _pretrain(cfg: RunConfig) -> dict[str, Any]:
    from chatforge.train.pretrain import pretrain

    return pretrain(cfg)


def model_stages() -> list[Stage]:
    """Training: pre-training on the shards (fine-tuning and alignment stages follow it)."""
    return [
        Stage("pretrain", ("model", "pretrain"),
              lambda c: [*paths(c).train_shards(), paths(c).val_shard, paths(c).tokenizer],
              lambda c: [paths(c).pretrain / "model", paths(c).pretrain / "eval.json"],
              _pretrain, "pre-train the GPT on next-token prediction"),
    ]


# Fine-tuning stages: section name -> (runner module, what it does).
FINETUNE_STAGES = {
    "sft": ("chat", "chat SFT on support conversations (assistant-only loss)"),
    "sentiment": ("classify", "sentiment classifier on reviews"),
    "intent": ("classify", "intent classifier on support conversations"),
    "translate": ("chat", "English -> Spanish translation (prompt -> completion)"),
    "tagging": ("tag", "product-attribute tagger (BIO token classification)"),
}


def run_finetune(cfg: RunConfig, section: str, resume: bool = False) -> dict[str, Any]:
    kind = FINETUNE_STAGES[section][0]
    if kind == "tag":
        from chatforge.finetune.tag import finetune_tagger

        return finetune_tagger(cfg, section, resume=resume)
    if kind == "classify":
        from chatforge.finetune.classify import finetune_classifier

        return finetune_classifier(cfg, section, resume=resume)
    from chatforge.finetune.sft import finetune_chat

    return finetune_chat(cfg, section, resume=resume)


def _finetune_inputs(cfg: RunConfig, section: str) -> list[Path]:
    from chatforge.finetune.common import data_sources

    sources = data_sources(cfg, section)
    p = paths(cfg)
    return [p.pretrain / "model", p.val_shard, *(Path(s) for s in sources.values() if not s.startswith("hf:"))]


def finetune_stages() -> list[Stage]:
    def stage(section: str) -> Stage:
        return Stage(section, (section,), lambda c: _finetune_inputs(c, section),
                     lambda c: [paths(c).root / "finetune" / section / "model",
                                paths(c).root / "finetune" / section / "eval.json"],
                     lambda c: run_finetune(c, section), FINETUNE_STAGES[section][1])

    return [stage(s) for s in FINETUNE_STAGES]


def all_stages() -> list[Stage]:
    """Every stage the pipeline knows, in order."""
    return data_stages() + model_stages() + finetune_stages()


def run_pipeline(cfg: RunConfig, only: list[str] | None = None, force: list[str] = (), **hooks: Any
                 ) -> list[StageResult]:
    """Run the stages named in ``only`` (default: all) that are out of date."""
    stages = all_stages()
    if only:
        stages = [s for s in stages if s.name in only]
    return run_stages(cfg, stages, force=force, **hooks)
