"""The run's pre-training data seen from a later stage: replay batches and the forgetting measure.

Forgetting: every stage that starts from another model measures the backbone's
held-out pre-training loss before and after training (same blocks, same code as
pre-training's evaluation), so the price paid in general ability is a number in
every report.

Replay mixes next-token loss on pre-training blocks into every step. Under the
loss contract (sums and counts, see ``train.loop``) the replay tokens join the
stage's units with a weight ``lam`` chosen so that, on average, a share ``replay``
of the step's loss weight is on them: ``lam * n_lm / (units + lam * n_lm) = replay``
for the stage's expected units per micro-batch. Each token keeps a fixed weight,
so any grouping of the same examples still gives the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatforge.data.loader import TokenLoader, iter_eval_blocks
from chatforge.data.shard import SUMMARY_NAME, split_files
from chatforge.device import Precision
from chatforge.errors import ChatforgeError
from chatforge.eval.lm import evaluate_lm, token_byte_lengths
from chatforge.model.gpt import GPT
from chatforge.train.dist import DistInfo
from chatforge.train.loop import LossFn, LossOutput, as_loss_output


@dataclass
class PretrainData:
    """The run's pre-training shards: for replay batches and the forgetting measure."""

    train: list[Path]
    val: list[Path]

    @classmethod
    def of(cls, data_dir: Path) -> PretrainData | None:
        """The shards under ``data_dir``, or None when there are none (no ``shards.json``: e.g. a run
        that fine-tunes a model from elsewhere with ``--init-from DIR``). A broken summary is an error."""
        if not (Path(data_dir) / SUMMARY_NAME).is_file():
            return None
        train, val = split_files(data_dir, "train"), split_files(data_dir, "val")
        return cls(train, val) if train and val else None

    def replay_loader(self, block_size: int, batch_size: int, seed: int, dist: DistInfo | None = None
                      ) -> TokenLoader:
        """Replay blocks; under DDP each rank reads its own slice of the same global stream."""
        dist = dist or DistInfo()
        return TokenLoader(self.train, block_size, batch_size, seed=seed, rank=dist.rank, world_size=dist.world_size)

    def heldout_loss(self, backbone: GPT, tok: Any, batches: int, precision: Precision) -> dict[str, float]:
        """The backbone's held-out next-token metrics on the pre-training validation split."""
        blocks = iter_eval_blocks(self.val, backbone.config.block_size, 8, batches)
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad(), precision.autocast():
            out = evaluate_lm(backbone, blocks, token_byte_lengths(tok), precision.device)
        backbone.train(was_training)
        return out


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        "pretrain_val_loss_before": before["val_loss"], "pretrain_val_loss_after": after["val_loss"],
        "pretrain_val_ppl_before": before["val_ppl"], "pretrain_val_ppl_after": after["val_ppl"],
        "forgetting_ppl_change_pct": 100.0 * (after["val_ppl"] / before["val_ppl"] - 1.0),
    }


class WithReplay:
    """A stage's batches, plus a batch of pre-training blocks under ``"lm"`` (both positions go
    into checkpoints). The stage's batches must be dicts."""

    def __init__(self, batches: Any, replay: TokenLoader):
        self.batches, self.replay = batches, replay

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self.batches))
        batch["lm"] = next(self.replay)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.batches.load_state_dict(s["batches"])
        self.replay.load_state_dict(s["replay"])


def replay_weight(replay: float, units_per_batch: float, lm_tokens_per_batch: int) -> float:
    """``lam``: the weight of one replay token (see the module docstring)."""
    return replay / (1.0 - replay) * units_per_batch / max(lm_tokens_per_batch, 1)


def with_replay_loss(loss: LossFn, backbone: GPT, lam: float, name: str) -> LossFn:
    """The stage's loss plus ``lam`` x the next-token loss summed over the batch's ``"lm"`` blocks."""

    def replayed(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        x, y = (t.to(backbone.output_weight.device) for t in batch["lm"])
        out = as_loss_output(loss(model, {k: v for k, v in batch.items() if k != "lm"}), name)
        # through the unwrapped backbone: a second forward of the DDP wrapper before backward is not allowed
        lm_sum = backbone(x, y, loss_reduction="sum")[1]
        n_lm = int((y != -1).sum())
        metrics = {**out.metrics, "replay_loss": (lm_sum.detach(), n_lm)}
        tokens = None if out.tokens is None else out.tokens + x.numel()
        return LossOutput(out.sum + lam * lm_sum, out.count + lam * n_lm, metrics, tokens)

    return replayed


def require_pretrain_data(data: PretrainData | None, data_dir: Path, why: str) -> PretrainData:
    if data is None:
        raise ChatforgeError(f"{data_dir}: no pre-training shards ({why}); run the data stages first")
    return data
