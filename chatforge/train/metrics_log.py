"""Where training metrics go: ``metrics.jsonl`` always, TensorBoard and W&B when asked for.

``metrics.jsonl`` has one JSON object per line with a ``kind`` ("train", "eval",
"sample") and the ``step``. On resume, lines after the checkpoint's step are
dropped (they belong to the part of the run being redone), so the file always
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatforge.errors import ConfigError
from chatforge.io import atomic_write


class MetricsLog:
    """Append-only metrics for one training run (only rank 0 makes one)."""

    def __init__(self, path: Path, tensorboard: bool = False, wandb_project: str = "",
                 run_name: str = "", config: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError(f"wandb_project={wandb_project!r} needs the wandb package: pip install wandb") from e
            self._wandb = wandb.init(project=wandb_project, name=run_name or None, config=config or {})

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (used when resuming from a checkpoint at ``step``)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").split("\n"):
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: it is redone anyway
        with atomic_write(self.path) as f:
            f.write("".join(k + "\n" for k in keep))

    def reset(self) -> None:
        with atomic_write(self.path) as f:
            f.write("")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items()
                   if k not in ("step", "kind") and isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (of one ``kind`` if given)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out
