"""The one training loop. Every stage (pre-training, SFT, task heads, reward model,
DPO) hands it a ``TrainTask``: a model, an endless iterator of micro-batches and a
loss. The loop owns everything else, once: AdamW with decay only on matmul
weights (or Muon for the hidden matrices, ``train.optim``), the LR schedule, gradient accumulation up to ``tokens_per_step``,
clipping, mixed precision, DDP or FSDP2 (``train.dist.FSDPRun``), activation
checkpointing, held-out evaluation and samples, non-finite loss
detection, metrics, a progress bar, and checkpoints that resume exactly.

The loss contract: a stage's loss returns ``(sum, count, metrics)``, the loss
summed over the micro-batch's units (learned tokens, examples, pairs) and how
many units there were. The loop back-propagates the sums, then divides the
gradients by the count all-reduced over the step's micro-batches and ranks. So
an optimizer step's gradient is that of the mean over every unit of the step,
however the units are grouped: 1 micro-batch of 8 rows, 2 of 4, or 2 ranks of 4
give the same gradient even when the rows hold different numbers of learned
tokens (a mean of micro-batch means would weight a short row's tokens more).
``metrics`` maps names to ``(sum, count)`` pairs reduced the same way, and
logged beside the loss (e.g. accuracy over a step's examples).

Exact resume: a checkpoint holds the weights, optimizer and loss-scaler state,
every RNG state and the batch iterator's position. Restoring them all makes the
steps after a resume the same computation as in an uninterrupted run, so (on the
same hardware and thread count) the loss curve continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from chatforge.config import TrainConfig
from chatforge.device import Precision
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.flops import peak_flops
from chatforge.train.checkpoint import (
    TRAINER_STATE,
    check_same_model,
    checkpoint_path,
    latest_checkpoint,
    load_model_weights,
    prune_checkpoints,
    read_model_config,
    save_model,
)
from chatforge.train.dist import DistInfo, FSDPRun, all_reduce_sum, checkpoint_blocks
from chatforge.train.metrics_log import MetricsLog
from chatforge.train.optim import make_optimizer
from chatforge.train.schedule import lr_multiplier


class NonFiniteLossError(ChatforgeError):
    """The loss or the gradient became NaN/inf: the run stops rather than continue silently."""


Number = torch.Tensor | float | int


@dataclass
class LossOutput:
    """What a stage's loss returns for one micro-batch (see the module docstring)."""

    sum: torch.Tensor  # the loss summed over the micro-batch's units, with its graph
    count: Number  # how many units (learned tokens, examples, pairs) the sum is over
    metrics: dict[str, tuple[Number, Number]] = field(default_factory=dict)  # name -> (sum, count)
    tokens: int | None = None  # input tokens processed (for tok/s); None: the task's tokens_per_micro_batch


LossFn = Callable[[nn.Module, Any], "LossOutput | tuple"]


def as_loss_output(value: Any, task_name: str) -> LossOutput:
    """A ``LossOutput`` from what a loss returned: a ``LossOutput``, ``(sum, count)`` or
    ``(sum, count, metrics)``; anything else (e.g. a bare mean) is a clear error."""
    if isinstance(value, LossOutput):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        return LossOutput(value[0], value[1], value[2] if len(value) == 3 else {})
    raise ChatforgeError(f"{task_name}: the loss must return (sum, count) or (sum, count, metrics) (the loop "
                         f"divides by the count over the whole step), got {type(value).__name__}")


@dataclass
class TrainTask:
    """What a stage gives the loop."""

    name: str  # the stage, e.g. "pretrain"; recorded in checkpoints
    model: nn.Module  # on its device, not wrapped in DDP
    tokenizer: Any  # saved into every checkpoint
    batches: Any  # endless iterator of micro-batches with state_dict()/load_state_dict()
    loss: LossFn  # (model, batch) -> LossOutput | (sum, count[, metrics]); model may be DDP
    tokens_per_micro_batch: int  # tokens one micro-batch trains on, per process (for accumulation and tok/s)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # held-out metrics, e.g. val_loss
    sample: Callable[[nn.Module], list[str]] | None = None  # generations shown at eval time
    flops_per_token: float | None = None  # training FLOPs per token, for MFU
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields for checkpoints' config.json
    # the GPT inside ``model`` whose config a resume must match (None: ``model`` itself)
    backbone: nn.Module | None = None
    # AdamW groups (e.g. with an "lr_scale" per group); None: ``make_adamw``'s decay / no-decay split
    param_groups: list[dict[str, Any]] | None = None
    # called after every optimizer step with (step, that step's logged metrics): KL controllers,
    # reference-model refresh, inner epochs. Runs on every rank.
    after_step: Callable[[int, dict[str, float]], None] | None = None


@dataclass
class TrainResult:
    step: int
    tokens: int
    wall_time_s: float  # training time over every session of the run (resumes add up)
    last_train_loss: float
    eval: dict[str, float]
    checkpoint: Path | None
    samples: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_time_s, 1e-9)


@dataclass
class StepStats:
    """One optimizer step's reduced numbers (the same on every rank)."""

    loss: float  # sum / count over the step's micro-batches and ranks
    count: float
    tokens: int  # input tokens over micro-batches and ranks
    metrics: dict[str, float]


def accumulate_gradients(model: nn.Module, loss_fn: LossFn, batches: list[Any], precision: Precision,
                         dist: DistInfo, params: list[torch.nn.Parameter], scaler: Any = None,
                         default_tokens: int = 0, task_name: str = "train") -> StepStats:
    """Forward and backward ``batches`` (this rank's micro-batches of one step), leaving in every
    parameter's ``.grad`` the gradient of the step's mean loss: sum over every rank's units divided
    by their count. ``model`` may be DDP-wrapped (gradients then sync on the last micro-batch).

    DDP averages gradients over ranks, so after it every ``.grad`` holds
    ``(1/W) * sum_r grad(sum_r)``; multiplying by ``W / count`` gives ``grad(sum / count)``. The sums
    are back-propagated divided by one constant (``default_tokens``, the same on every rank and
    micro-batch) and multiplied back at the end, so fp16 loss scaling sees values of a mean's size."""
    device = precision.device
    norm = float(max(default_tokens, 1))
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    tokens = 0
    metric_sums: dict[str, list[torch.Tensor]] = {}
    for micro, batch in enumerate(batches):
        sync = not dist.enabled or micro == len(batches) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync():
            with precision.autocast():
                out = as_loss_output(loss_fn(model, batch), task_name)
            total = out.sum.float()
            scaled = total / norm
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += total.detach()
        count += torch.as_tensor(out.count, dtype=torch.float32, device=device)
        tokens += default_tokens if out.tokens is None else int(out.tokens)
        for name, (msum, mcount) in out.metrics.items():
            pair = metric_sums.setdefault(name, [torch.zeros((), device=device), torch.zeros((), device=device)])
            pair[0] += torch.as_tensor(msum, dtype=torch.float32, device=device).detach()
            pair[1] += torch.as_tensor(mcount, dtype=torch.float32, device=device).detach()
    names = list(metric_sums)
    sums = [loss_sum, count, torch.tensor(float(tokens), device=device)]
    for name in names:
        sums.extend(metric_sums[name])
    reduced = all_reduce_sum(torch.stack(sums), dist).tolist()
    total_count = reduced[1]
    scale = norm * dist.world_size / total_count if total_count > 0 else 0.0  # no units: nothing to learn
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    metrics = {name: reduced[3 + 2 * i] / max(reduced[4 + 2 * i], 1e-12) for i, name in enumerate(names)}
    return StepStats(loss=reduced[0] / total_count if total_count > 0 else 0.0, count=total_count,
                     tokens=int(reduced[2]), metrics=metrics)


def grad_accum_steps(cfg: TrainConfig, tokens_per_micro_batch: int, world_size: int, section: str) -> int:
    """Micro-batches per optimizer step on each process: ``grad_accum`` when set, else as many
    as reach ``tokens_per_step``."""
    if cfg.grad_accum:
        return cfg.grad_accum
    per_round = tokens_per_micro_batch * world_size
    if cfg.tokens_per_step == 0:
        return 1
    if cfg.tokens_per_step % per_round:
        raise ConfigError(
            f"{section}.tokens_per_step: {cfg.tokens_per_step} is not a multiple of batch_size x block_size x "
            f"processes = {per_round}; use e.g. {max(1, round(cfg.tokens_per_step / per_round)) * per_round}"
        )
    return cfg.tokens_per_step // per_round


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    task: TrainTask,
    cfg: TrainConfig,
    out_dir: Path,
    precision: Precision,
    dist: DistInfo | None = None,
    resume: bool = False,
    section: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train ``task.model`` for ``cfg.max_steps`` optimizer steps; checkpoints go to ``out_dir/ckpt``.

    ``resume``: continue from the newest checkpoint in ``out_dir/ckpt`` (an error if
    there is none). Without it, earlier checkpoints and metrics there are replaced.
    """
    dist = dist or DistInfo()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "ckpt"
    raw_model = task.model
    backbone = task.backbone or raw_model
    accum = grad_accum_steps(cfg, task.tokens_per_micro_batch, dist.world_size, section)
    fsdp = dist.enabled and cfg.parallel == "fsdp"
    if fsdp:
        check_fsdp(cfg, precision, section)
    last_ckpt: Path | None = None
    if resume:  # the weights go in before sharding; the optimizer's state after it is built
        last_ckpt = latest_checkpoint(ckpt_root)
        if last_ckpt is None:
            raise ChatforgeError(f"--resume: no checkpoint in {ckpt_root} to resume from; run without --resume")
        saved = read_model_config(last_ckpt)
        check_same_model(saved["model"], backbone.config, last_ckpt)
        load_model_weights(raw_model, last_ckpt)
    sharded = FSDPRun(raw_model) if fsdp else None  # parameters become DTensor shards, in place
    undo_checkpointing = checkpoint_blocks(raw_model) if cfg.activation_checkpointing else None

    if task.param_groups is not None:
        groups = sharded.param_groups(task.param_groups) if sharded else task.param_groups
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    else:
        optimizer = make_optimizer(raw_model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                   precision.device.type, cfg.muon_lr, section)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = precision.grad_scaler()
    step, tokens_seen = 0, 0
    time_before = 0.0  # training seconds of earlier sessions of this run (resumes add up)
    last_loss = float("nan")
    log = MetricsLog(out_dir / "metrics.jsonl", cfg.tensorboard, cfg.wandb_project, task.name,
                     {"train": vars(cfg)}) if dist.is_main else None

    if resume:
        state = torch.load(last_ckpt / TRAINER_STATE, map_location=precision.device, weights_only=False)
        if sharded:
            sharded.load_optimizer_state(optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        # One entry per rank of the run that saved; a resume with another world size reuses rank 0's
        # (the TokenLoader's position is global, so it continues the same sample stream).
        mine = dist.rank if dist.rank < len(state["batches"]) else 0
        task.batches.load_state_dict(state["batches"][mine])
        _set_rng_state(state["rng"][mine])
        step, tokens_seen = state["step"], state["tokens"]
        time_before = float(state.get("train_time_s", 0.0))
        last_loss = float(state.get("last_loss", float("nan")))
        if log:
            log.truncate_after(step)
    else:
        seed_everything(cfg.seed + dist.rank)
        if dist.is_main:
            shutil.rmtree(ckpt_root, ignore_errors=True)
            if log:
                log.reset()

    model: nn.Module = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if dist.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [precision.device.index] if precision.device.type == "cuda" else None
        model = DDP(model, device_ids=ids)

    peak = peak_flops(precision.device)
    start_time = time.perf_counter()
    result_eval: dict[str, float] = {}
    samples: list[str] = []

    def train_time() -> float:
        return time_before + time.perf_counter() - start_time

    def run_eval(at_step: int) -> None:
        nonlocal result_eval
        if task.evaluate is not None:
            raw_model.eval()
            with torch.no_grad(), precision.autocast():
                result_eval = task.evaluate(raw_model)
            raw_model.train()
            if log:
                log.log({"kind": "eval", "step": at_step, **result_eval})
                bar.write(f"step {at_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result_eval.items()))
        if task.sample is not None and dist.is_main and not fsdp:  # fsdp: sampled once unsharded, at the end
            draw_samples(at_step, echo=True)

    def draw_samples(at_step: int, echo: bool) -> None:
        nonlocal samples
        raw_model.eval()
        with torch.no_grad(), precision.autocast():
            samples = task.sample(raw_model)
        raw_model.train()
        if log:
            log.log({"kind": "sample", "step": at_step, "samples": samples})
            for s in samples if echo else ():
                bar.write(f"  sample: {s!r}")

    def save(at_step: int) -> Path:
        # fsdp: every rank takes part in gathering the full weights and optimizer state onto rank 0, so
        # the files are the ones a single process writes (and loads: any world size resumes them)
        weights = sharded.model_state() if sharded else None
        state = {
            "step": at_step, "tokens": tokens_seen,
            "optimizer": sharded.optimizer_state(optimizer) if sharded else optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "batches": _gather(task.batches.state_dict(), dist), "rng": _gather(_rng_state(), dist),
            "train_config": vars(cfg), "train_time_s": train_time(), "last_loss": last_loss,
        }
        path = checkpoint_path(ckpt_root, at_step)
        if dist.is_main:
            save_model(path, raw_model, task.tokenizer,
                       {"stage": task.name, "step": at_step, "tokens": tokens_seen, **task.meta},
                       extra_files={TRAINER_STATE: state}, state=weights)
            prune_checkpoints(ckpt_root, cfg.keep_last)
        return path

    import sys

    # On a terminal the bar redraws in place; in a log file every redraw is a new line, so redraw rarely.
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and dist.is_main), desc=task.name,
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    raw_model.train()
    if step == 0 and (cfg.eval_every or cfg.sample_every):
        run_eval(0)
    elif step >= cfg.max_steps:
        # Resumed from the final checkpoint (killed before the stage finished): no step is left,
        # but the final evaluation and samples still belong to the result.
        run_eval(step)
    tok_s_ema = 0.0
    finished = False
    try:
        while step < cfg.max_steps:
            lr = cfg.lr * lr_multiplier(step, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_frac,
                                        cfg.decay_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # e.g. a lower LR for a fine-tuned backbone
            t0 = time.perf_counter()
            micro_batches = [next(task.batches) for _ in range(accum)]
            stats = accumulate_gradients(model, task.loss, micro_batches, precision, dist, params, scaler,
                                         default_tokens=task.tokens_per_micro_batch, task_name=task.name)
            if scaler is not None:
                scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # fsdp: a DTensor
            step_loss = stats.loss
            if not math.isfinite(step_loss) or (scaler is None and not math.isfinite(grad_norm)):
                what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {grad_norm}"
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise NonFiniteLossError(
                    f"{task.name}: {what} at step {step + 1} is not finite; stopped without updating the weights "
                    f"or writing a checkpoint ({where}). Lower {section}.lr, raise {section}.warmup_steps or "
                    f"use {section}.dtype=fp32, then resume with --resume"
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += stats.tokens
            last_loss = step_loss
            dt = time.perf_counter() - t0
            tok_s = stats.tokens / max(dt, 1e-9)
            tok_s_ema = tok_s if tok_s_ema == 0 else 0.9 * tok_s_ema + 0.1 * tok_s
            mfu = None
            if peak and task.flops_per_token:
                mfu = task.flops_per_token * tok_s / (peak * dist.world_size)
            postfix = {"loss": f"{step_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s_ema:,.0f}"}
            postfix.update({name: f"{v:.3g}" for name, v in stats.metrics.items()})
            if mfu is not None:
                postfix["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if task.after_step is not None:
                task.after_step(step, {"loss": step_loss, **stats.metrics})
            if log and (step == 1 or cfg.log_every and step % cfg.log_every == 0 or step == cfg.max_steps):
                rec = {"kind": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": tokens_seen, "tok_per_s": tok_s, "time_s": train_time(), **stats.metrics}
                if mfu is not None:
                    rec["mfu"] = mfu
                log.log(rec)
            final = step == cfg.max_steps
            if final or (cfg.eval_every and step % cfg.eval_every == 0) or \
                    (cfg.sample_every and step % cfg.sample_every == 0):
                run_eval(step)
            if final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                last_ckpt = save(step)
        finished = True
    finally:
        bar.close()
        if undo_checkpointing is not None:
            undo_checkpointing()
        if log and (sharded is None or not finished):
            log.close()
    if sharded:  # every rank gathers the trained weights; the model is a plain module again
        sharded.restore()
        if task.sample is not None and dist.is_main and step >= cfg.max_steps:
            draw_samples(step, echo=False)
        if log:
            log.close()
    return TrainResult(step=step, tokens=tokens_seen, wall_time_s=train_time(), last_train_loss=last_loss,
                       eval=result_eval, checkpoint=last_ckpt, samples=samples)


def check_fsdp(cfg: TrainConfig, precision: Precision, section: str) -> None:
    """What ``parallel=fsdp`` does not support, as a clear error before any work."""
    if precision.grad_scaler() is not None:
        raise ConfigError(f"{section}.parallel=fsdp: fp16 needs a loss scaler whose overflow check covers every "
                          f"rank's gradient shard, which this loop does not have; use {section}.dtype=bf16 or fp32")
    if getattr(cfg, "optimizer", "adamw") != "adamw":
        raise ConfigError(f"{section}.parallel=fsdp: optimizer={cfg.optimizer} orthogonalises whole matrices, but "
                          f"each rank holds only a shard of each; use {section}.optimizer=adamw or parallel=ddp")
    if cfg.compile:
        raise ConfigError(f"{section}.parallel=fsdp with {section}.compile=true is not supported yet; "
                          "turn one of them off")


def _gather(obj: Any, dist: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (loader positions and RNG states differ per rank), on every rank."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as torch_dist

    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out
