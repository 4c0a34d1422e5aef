"""What every fine-tuning stage shares: loading the pre-trained model, adapters and
freezing, per-group learning rates, pre-training replay and the forgetting measure.

Forgetting: each stage measures the backbone's held-out pre-training loss before
and after fine-tuning (same blocks, same code as pre-training's evaluation), so
the price paid in general ability is a number in every report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.config import FinetuneConfig, RunConfig
from chatforge.data.loader import TokenLoader, iter_eval_blocks
from chatforge.data.shard import split_files
from chatforge.errors import ChatforgeError
from chatforge.eval.lm import evaluate_lm, token_byte_lengths
from chatforge.finetune.peft import apply_lora, format_param_summary, freeze, param_summary
from chatforge.model.gpt import GPT, param_groups
from chatforge.train.checkpoint import load_model
from chatforge.train.dist import DistInfo, dist_from_env
from chatforge.train.precision import Precision

# The SupportWorld set each fine-tuning stage reads when its *_data fields are empty.
SUPPORTWORLD_SETS = {"sft": "conversations", "translate": "translation", "sentiment": "reviews",
                     "intent": "intents", "tagging": "tags"}


def stage_dir(cfg: RunConfig, section: str) -> Path:
    """Where a fine-tuning stage writes: ``runs/<run>/finetune/<section>/``."""
    from chatforge.pipeline import paths

    return paths(cfg).root / "finetune" / section


def data_sources(cfg: RunConfig, section: str) -> dict[str, str]:
    """train/val/test sources of a stage: the config's ``*_data``, else its SupportWorld set."""
    from chatforge.pipeline import paths

    f: FinetuneConfig = getattr(cfg, section)
    default = paths(cfg).supportworld / SUPPORTWORLD_SETS.get(section, section)
    return {split: getattr(f, f"{split}_data") or str(default / f"{split}.jsonl") for split in ("train", "val", "test")}


def base_model_dir(cfg: RunConfig) -> Path:
    from chatforge.pipeline import paths

    return paths(cfg).pretrain / "model"


def load_base(cfg: RunConfig, device: torch.device) -> tuple[GPT, Any]:
    """The pre-trained GPT and its tokenizer, with a clear error if pre-training has not run."""
    path = base_model_dir(cfg)
    if not (path / "config.json").is_file():
        raise ChatforgeError(f"{path}: no pre-trained model; run `chatforge pretrain` (or the pipeline) first")
    model, tok, _ = load_model(path, device)
    model.train()
    return model, tok


def adapt(model: nn.Module, f: FinetuneConfig, section: str, keep_trainable: tuple[str, ...] = (),
          dist: DistInfo | None = None) -> dict[str, Any]:
    """Apply the stage's LoRA or freezing; returns the parameter summary (printed by rank 0, reported)."""
    if f.lora_r > 0:
        apply_lora(model, targets=f.lora_targets, r=f.lora_r, alpha=f.lora_alpha, dropout=f.lora_dropout,
                   trainable=keep_trainable)
        method = f"LoRA r={f.lora_r} on {','.join(f.lora_targets)}"
    elif f.freeze != "none":
        freeze(model, f.freeze)
        method = f"frozen {f.freeze}"
    else:
        method = "full"
    summary = {**param_summary(model), "method": method}
    if (dist or dist_from_env()).is_main:  # every rank adapts its copy; one line is enough
        print(f"{section}: {method}; {format_param_summary(summary)}")
    return summary


def scaled_param_groups(model: nn.Module, weight_decay: float, backbone: nn.Module, scale: float
                        ) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale`` < 1 for the pre-trained backbone's weights
    (new heads and adapters keep the full LR): a lower backbone LR limits forgetting."""
    if scale == 1.0:
        return param_groups(model, weight_decay)
    backbone_ids = {id(p) for n, p in backbone.named_parameters() if "lora_" not in n}
    groups = []
    for g in param_groups(model, weight_decay):
        old = [p for p in g["params"] if id(p) in backbone_ids]
        new = [p for p in g["params"] if id(p) not in backbone_ids]
        for params, s, tag in ((old, scale, "backbone"), (new, 1.0, "new")):
            if params:
                groups.append({**g, "params": params, "lr_scale": s, "name": f"{g['name']}_{tag}"})
    return groups


def ddp_skip_unused_lm_head(model: nn.Module, backbone: GPT, dist: DistInfo) -> None:
    """Under DDP, leave the backbone's LM head out of gradient synchronisation.

    A task head reads ``forward_hidden``, so without replay the (untied) ``lm_head`` gets
    no gradient, and DDP (which the loop builds without ``find_unused_parameters``) stops
    at the next step waiting for it. It is never updated then, and every rank loaded the
    same weights, so it needs no syncing. With replay it is trained and must stay in."""
    if not dist.enabled or backbone.lm_head is None:
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    head_ids = {id(p) for p in backbone.lm_head.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in head_ids]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)


def task_replay(pre: PretrainData, model: nn.Module, backbone: GPT, f: FinetuneConfig, tokens_per_batch: float,
                dist: DistInfo) -> TokenLoader | None:
    """Replay blocks for a task-head stage (classify, tag), or None when ``f.replay`` is 0.

    About as many pre-training tokens per step as the task batch holds (whole blocks, at least
    one), sized from the per-rank batch: under DDP the ranks' rows add up to those of one process
    with the global batch whenever the rounding agrees (e.g. 2 ranks x 1 row = 1 process x 2 rows).
    Without replay the LM head gets no gradient, so DDP is told to skip it."""
    if f.replay <= 0:
        ddp_skip_unused_lm_head(model, backbone, dist)
        return None
    block = backbone.config.block_size
    return pre.replay_loader(block, max(1, round(tokens_per_batch / block)), f.seed, dist)


@dataclass
class PretrainData:
    """The run's pre-training shards: for replay batches and the forgetting measure."""

    train: list[Path]
    val: list[Path]

    @classmethod
    def of(cls, cfg: RunConfig) -> PretrainData:
        from chatforge.pipeline import paths

        data = paths(cfg).data
        train, val = split_files(data, "train"), split_files(data, "val")
        if not train or not val:
            raise ChatforgeError(f"{data}: no pre-training shards (needed for replay and the forgetting measure); "
                                 "run the data stages first")
        return cls(train, val)

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


class WithReplay:
    """A stage's batches (dicts of tensors) moved to the device, plus a batch of pre-training
    blocks under ``"lm"`` when replay is on; both positions go into checkpoints."""

    def __init__(self, batches: Any, replay: TokenLoader | None, device: torch.device):
        self.batches, self.replay, self.device = batches, replay, device

    def __next__(self) -> dict[str, Any]:
        batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
        if self.replay is not None:
            x, y = next(self.replay)
            batch["lm"] = (x.to(self.device), y.to(self.device))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "replay": self.replay.state_dict() if self.replay else None}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.batches.load_state_dict(s["batches"])
        if self.replay is not None and s.get("replay"):
            self.replay.load_state_dict(s["replay"])


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        "pretrain_val_loss_before": before["val_loss"], "pretrain_val_loss_after": after["val_loss"],
        "pretrain_val_ppl_before": before["val_ppl"], "pretrain_val_ppl_after": after["val_ppl"],
        "forgetting_ppl_change_pct": 100.0 * (after["val_ppl"] / before["val_ppl"] - 1.0),
    }


class ShuffledBatches:
    """Endless shuffled batches of task examples (classification, tagging): a resumable
    ``EpochShuffler`` order, this rank's slice of each global batch, made into tensors by ``collate``."""

    def __init__(self, examples: list[Any], batch_size: int, seed: int, collate: Callable[[list[Any]], dict[str, Any]],
                 dist: DistInfo | None = None):
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.dist = dist or DistInfo()
        self.order = EpochShuffler(len(examples), seed)

    def __next__(self) -> dict[str, Any]:
        return self.collate([self.examples[i] for i in self.order.take_rank(self.batch_size, self.dist)])

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.order.load_state_dict(s)


class EpochShuffler:
    """Endless, resumable order over ``n`` examples: a fresh seeded permutation each epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ChatforgeError("no training examples")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._make(0)

    def _make(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take_rank(self, k: int, dist: DistInfo) -> list[int]:
        """This rank's ``k`` of the next ``k * world_size`` indices: N ranks with batch k see exactly
        the examples one process with batch N * k sees, so a DDP run matches a single-process one."""
        ids = self.take(k * dist.world_size)
        return ids[dist.rank * k:(dist.rank + 1) * k]

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make(self.epoch)
            out.append(int(self._perm[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, s: dict[str, int]) -> None:
        if s["n"] != self.n or s["seed"] != self.seed:
            raise ChatforgeError(f"cannot resume: the checkpoint's data has {s['n']} examples (seed {s['seed']}), "
                                 f"this run has {self.n} (seed {self.seed}); resume on the same data")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._make(self.epoch)
