"""Every path of a run, defined once: ``RunPaths`` for the run, ``StagePaths`` for one stage.

A leaf module (it imports nothing of chatforge), so the pipeline, the stages, the
CLI and the server all take their paths from here and no module rebuilds a
``runs/<run>/finetune/<stage>/`` path by hand.

Layout of ``runs/<run>/``::

    supportworld/            the built-in data (when no sources are given)
    data/                    raw.jsonl, clean.jsonl, clean_report.json, train_*.bin, val.bin, shards.json
    tokenizer/
    pretrain/                a training stage's directory (see StagePaths)
    finetune/<stage>/        sft, translate, sentiment, intent, tagging, ...
    manifest.json
    feedback.db              the feedback store (``chatforge serve``)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MODEL = "model"
VERSIONS = "versions"


@dataclass(frozen=True)
class StagePaths:
    """What one training stage writes under its directory.

    ``model/`` is always the stage's newest model. When a stage writes a new model
    while an older one is there, the older one moves to ``versions/<version>/``
    first (a rename), so a model that a later stage was trained from, or that
    users rated, is never overwritten."""

    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def versions(self) -> Path:
        return self.root / VERSIONS

    def version(self, version: str) -> Path:
        return self.versions / version

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def answers(self) -> Path:
        return self.root / "answers.jsonl"

    @property
    def confusion(self) -> Path:
        return self.root / "confusion.txt"


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of a run writes."""

    root: Path

    @classmethod
    def of(cls, runs_dir: str | Path = "runs", name: str = "default") -> RunPaths:
        return cls(Path(runs_dir) / name)

    @property
    def name(self) -> str:
        return self.root.name

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
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def feedback_db(self) -> Path:
        return self.root / "feedback.db"

    @property
    def feedback_export(self) -> Path:
        return self.root / "feedback"

    def stage(self, subdir: str) -> StagePaths:
        """A training stage's paths; ``subdir`` is its directory under the run, e.g. ``finetune/sft``."""
        return StagePaths(self.root / subdir)

    @property
    def pretrain(self) -> StagePaths:
        return self.stage("pretrain")

    def model_dirs(self) -> Iterator[Path]:
        """The newest model directory of every stage of the run (``<stage dir>/model`` holding a
        ``config.json``), in path order."""
        for config in sorted(self.root.glob(f"**/{MODEL}/config.json")):
            directory = config.parent
            if VERSIONS not in directory.relative_to(self.root).parts and "ckpt" not in directory.parts:
                yield directory


def stage_of_model_dir(model_dir: Path) -> tuple[Path, str] | None:
    """``(run directory, stage subdir)`` for ``<run>/<stage subdir>/model`` or
    ``<run>/<stage subdir>/versions/<v>``; None for a directory outside that layout.

    A run directory is recognised by its ``manifest.json`` or ``tokenizer/``."""
    p = Path(model_dir).resolve()
    if p.name == MODEL:
        stage_dir = p.parent
    elif p.parent.name == VERSIONS:
        stage_dir = p.parent.parent
    else:
        return None
    for run in stage_dir.parents:
        if (run / "manifest.json").is_file() or (run / "tokenizer").is_dir():
            return run, stage_dir.relative_to(run).as_posix()
    return None
