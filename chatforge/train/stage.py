"""The stage harness: what every training stage shares, done once.

A stage (declared in ``chatforge.stages``) supplies only what is its own, through
``build(ctx) -> StageParts``: the model to train (the parent's GPT, perhaps with a
head), its batches, its loss (sums and counts, see ``train.loop``), its held-out
evaluation and its final test. ``run_stage`` does the rest for every stage:

1. device, precision, DDP rank, seeds;
2. the parent model (``STAGE.init_from``: "" = the declaration's default, a stage of
   the run such as ``sft`` or ``pretrain``, or a model directory), or a fresh GPT for
   pre-training from scratch;
3. adapters and freezing (LoRA, ``freeze``), per-group learning rates, pre-training
   replay, and the forgetting measure before and after;
4. the one training loop;
5. merging LoRA, the final test, and saving a model that records its own version
   (the first 12 hex digits of its weights' sha256) and its parent's, so lineage can
   be followed from any model back to pre-training, and registering it
   (``chatforge.registry``: ``runs/registry/``);
6. one ``eval.json`` schema for every stage (below).

Saving never overwrites a model silently: the stage's ``model/`` is its newest model,
and the one that was there moves to ``versions/<version>/`` first.

``eval.json``::

    {"stage", "task", "version", "parent": {"stage", "version", "path"} | null,
     "data": {split: {"source", "fingerprint"}},
     "primary": {"name", "value", "goal": "max" | "min"},
     "metrics": {name: number},            every measured number, held-out and test
     "details": {...},                     non-scalar results: confusion, samples, ...
     "train": {"steps", "tokens", "tokens_per_s", "final_train_loss", "dtype", "device",
               "world_size", "method", "trainable_params", "total_params"},
     "wall_time_s", "created_at", "versions"}
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatforge.config import FinetuneConfig, ModelConfig, RunConfig, TrainConfig
from chatforge.device import Precision, resolve_device, resolve_precision
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.io import atomic_write, sha256_file, write_json, write_jsonl
from chatforge.model.gpt import GPT, GPTConfig, param_groups
from chatforge.model.lora import apply_lora, format_param_summary, freeze, merge_lora, param_summary
from chatforge.paths import RunPaths, StagePaths
from chatforge.run import versions
from chatforge.stages import StageDecl, data_sources, get_stage, resolve_parent
from chatforge.train.checkpoint import load_model, model_version, save_model
from chatforge.train.dist import DistInfo, dist_from_env, init_distributed
from chatforge.train.loop import LossFn, TrainResult, TrainTask, seed_everything, train
from chatforge.train.replay import (
    PretrainData,
    WithReplay,
    forgetting,
    replay_weight,
    require_pretrain_data,
    with_replay_loss,
)

EVAL_SCHEMA = 1


@dataclass(frozen=True)
class Parent:
    """The model a stage starts from."""

    path: Path
    stage: str | None  # the stage that wrote it (its config.json), when known
    version: str

    def record(self, run: RunPaths) -> dict[str, Any]:
        path = self.path.resolve()
        root = run.root.resolve()
        shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        return {"stage": self.stage, "version": self.version, "path": shown}


@dataclass
class StageContext:
    """What a stage's ``build`` gets: the run, its section, the parent model on its device."""

    cfg: RunConfig
    decl: StageDecl
    section: TrainConfig  # cfg.<decl.name>
    run: RunPaths
    out: StagePaths
    dist: DistInfo
    device: torch.device
    precision: Precision
    tokenizer: Any
    backbone: GPT  # the parent's GPT (in train mode), or a fresh one
    parent: Parent | None
    sources: dict[str, str]  # data sources by split: "train", "val", "test"

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def say(self, text: str) -> None:
        """Print once (rank 0)."""
        if self.is_main:
            print(text, flush=True)


@dataclass
class StageTest:
    """A stage's final held-out results (run on rank 0 after training and merging)."""

    metrics: dict[str, float]  # scalars
    primary: str  # the one metric that says how good the model is (a key of ``metrics``)
    details: dict[str, Any] = field(default_factory=dict)  # non-scalar results
    files: dict[str, list[dict[str, Any]] | str] = field(default_factory=dict)  # name -> JSONL rows or text


@dataclass
class StageParts:
    """What a stage supplies (see the module docstring)."""

    model: nn.Module  # what is trained: ``ctx.backbone`` itself, or a module holding it as ``.backbone``
    batches: Any  # endless iterator of micro-batches with state_dict()/load_state_dict()
    loss: LossFn
    tokens_per_micro_batch: int
    test: Callable[[nn.Module, TrainResult], StageTest]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    sample: Callable[[nn.Module], list[str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # saved into config.json (labels, pooling, ...)
    keep_trainable: tuple[str, ...] = ()  # parameter-name parts left trainable under LoRA (new heads)
    units_per_batch: float = 0.0  # expected loss units per micro-batch (sizes the replay weight)
    info: dict[str, Any] = field(default_factory=dict)  # numbers known before training (examples, truncation)
    flops_per_token: float | None = None
    save: nn.Module | None = None  # what is saved as the stage's model when not ``model`` (e.g. PPO's policy GPT
    # without its value head)
    uses_lm_head: bool = False  # a head-bearing ``model`` that still trains the LM head (PPO's policy)


# --------------------------------------------------------------------------- parents and data


def gpt_config(m: ModelConfig, vocab_size: int) -> GPTConfig:
    """The GPT shape a ``[model]`` section describes, for a tokenizer of ``vocab_size``."""
    overrides: dict[str, Any] = {
        "mlp_ratio": m.mlp_ratio, "tie_embeddings": m.tie_embeddings, "qk_norm": m.qk_norm,
        "dropout": m.dropout, "logit_softcap": m.logit_softcap, "rope_theta": m.rope_theta,
        "key_smear": m.key_smear,
    }
    if m.n_embd:
        overrides["n_embd"] = m.n_embd
    if m.n_head:
        overrides["n_head"] = m.n_head
    if m.n_kv_head:
        overrides["n_kv_head"] = m.n_kv_head
    try:
        return GPTConfig.from_depth(m.depth, vocab_size=vocab_size, block_size=m.block_size, **overrides)
    except ConfigError as e:
        raise ConfigError(str(e).replace("GPTConfig.", "model.")) from e



def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return "sha256:" + h.hexdigest()[:16]


def data_fingerprints(sources: dict[str, str]) -> dict[str, dict[str, str]]:
    out = {}
    for split, source in sources.items():
        if source.startswith("hf:") or not Path(source).is_file():
            out[split] = {"source": source, "fingerprint": source if source.startswith("hf:") else "missing"}
        else:
            out[split] = {"source": source, "fingerprint": _fingerprint([Path(source)])}
    return out


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two saved tokenizer directories hold the same files (the same ids for every text)."""
    files = lambda d: sorted(p for p in d.rglob("*") if p.is_file())  # noqa: E731
    fa, fb = files(a), files(b)
    return [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb] and \
        all(sha256_file(x) == sha256_file(y) for x, y in zip(fa, fb))


# --------------------------------------------------------------------------- adapters and optimizer groups


def adapt(model: nn.Module, f: FinetuneConfig, section: str, keep_trainable: tuple[str, ...], dist: DistInfo
          ) -> dict[str, Any]:
    """Apply the stage's LoRA or freezing; returns the parameter summary (printed once)."""
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
    if dist.is_main:  # every rank adapts its copy; one line is enough
        print(f"{section}: {method}; {format_param_summary(summary)}")
    return summary


def scaled_param_groups(model: nn.Module, weight_decay: float, backbone: nn.Module, scale: float
                        ) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale`` < 1 for the pre-trained backbone's weights
    (new heads and adapters keep the full LR): a lower backbone LR limits forgetting."""
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


# --------------------------------------------------------------------------- saving


def save_versioned(out: StagePaths, model: nn.Module, tokenizer: Any, meta: dict[str, Any]) -> str:
    """Write the stage's new ``model/``; the model that was there moves to ``versions/<version>/``.
    Returns the new model's version."""
    old_version = None
    if (out.model / "config.json").is_file():
        old_version = model_version(out.model)
        target = out.version(old_version)
        if target.exists():  # that exact model is already kept
            shutil.rmtree(out.model)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(out.model, target)
    save_model(out.model, model, tokenizer, meta)
    version = model_version(out.model)
    if version == old_version:  # the same weights again: keep one copy, under model/
        shutil.rmtree(out.version(version), ignore_errors=True)
    return version


def metric_goal(name: str) -> str:
    """Whether a metric is better high ("max") or low ("min")."""
    return "min" if name.endswith(("loss", "ppl", "bpb", "_pct")) else "max"


def flat_metrics(ev: dict[str, Any]) -> dict[str, Any]:
    """The primary metric first, then the other scalars: what the manifest and the summary line show."""
    primary = ev["primary"]["name"]
    rest = {k: v for k, v in ev["metrics"].items() if k != primary}
    return {primary: ev["metrics"].get(primary), **rest}


# --------------------------------------------------------------------------- the harness


def _load_build(decl: StageDecl) -> Callable[[StageContext], StageParts]:
    module, _, function = decl.build.partition(":")
    return getattr(importlib.import_module(module), function)


def run_stage(cfg: RunConfig, name: str, resume: bool = False, progress: bool = True,
              dist: DistInfo | None = None) -> dict[str, Any]:
    """Run training stage ``name`` of ``cfg``'s run; returns its ``eval.json`` (``{}`` on ranks other than 0)."""
    from chatforge.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    decl = get_stage(name)
    f: TrainConfig = getattr(cfg, name)
    run = RunPaths(cfg.run_dir)
    out = run.stage(decl.subdir)
    dist = dist or dist_from_env()
    device = init_distributed(dist, resolve_device(f.device))
    precision = resolve_precision(f.dtype, device)
    seed_everything(f.seed)  # the same initial weights and heads on every rank

    parent_dir = resolve_parent(cfg, decl, f.init_from)
    if parent_dir is None:
        tokenizer = load_tokenizer(run.tokenizer)
        backbone = GPT(gpt_config(cfg.model, tokenizer.vocab_size)).to(device)
        parent = None
    else:
        backbone, tokenizer, parent_config = load_model(parent_dir, device)
        backbone.train()
        parent = Parent(parent_dir, parent_config.get("stage"), model_version(parent_dir))
    ctx = StageContext(cfg, decl, f, run, out, dist, device, precision, tokenizer, backbone, parent,
                       data_sources(cfg, decl))
    parts = _load_build(decl)(ctx)
    model = parts.model

    finetuning = isinstance(f, FinetuneConfig)
    pre = PretrainData.of(run.data)
    if finetuning:
        params = adapt(model, f, name, parts.keep_trainable, dist)
    else:
        params = {**param_summary(model), "method": "full"}
    before = pre.heldout_loss(backbone, tokenizer, f.forgetting_batches, precision) \
        if finetuning and pre is not None and parent is not None else None
    if before is None and finetuning and parent is not None:
        ctx.say(f"{name}: no pre-training shards in {run.data}: forgetting is not measured")

    batches, loss = parts.batches, parts.loss
    if finetuning and f.replay > 0:
        pre = require_pretrain_data(pre, run.data, f"{name}.replay is {f.replay}")
        block = backbone.config.block_size
        rows = max(1, round(parts.tokens_per_micro_batch / block))
        batches = WithReplay(batches, pre.replay_loader(block, rows, f.seed, dist))
        loss = with_replay_loss(loss, backbone, replay_weight(f.replay, parts.units_per_batch, rows * block), name)
    elif model is not backbone and not parts.uses_lm_head:
        ddp_skip_unused_lm_head(model, backbone, dist)  # a head without replay never uses the LM head

    scale = f.backbone_lr_scale if finetuning else 1.0
    task = TrainTask(
        name=name, model=model, tokenizer=tokenizer, batches=batches, loss=loss,
        tokens_per_micro_batch=parts.tokens_per_micro_batch, evaluate=parts.evaluate, sample=parts.sample,
        flops_per_token=parts.flops_per_token, backbone=backbone,
        meta={"task": decl.task, "dtype": precision.name, **parts.meta},
        param_groups=scaled_param_groups(model, f.weight_decay, backbone, scale) if scale != 1.0 else None,
    )
    result = train(task, f, out.root, precision, dist, resume=resume, section=name, progress=progress)
    if not dist.is_main:  # no barrier: rank 0's test evaluation may outlast a collective's timeout
        return {}

    merge_lora(model)
    metrics: dict[str, Any] = {}
    if before is not None:
        after = pre.heldout_loss(backbone, tokenizer, f.forgetting_batches, precision)
        metrics.update(forgetting(before, after))
    model.eval()
    with torch.no_grad(), precision.autocast():
        test = parts.test(model, result)
    model.train()
    metrics = {**test.metrics, **result.eval, **metrics, "final_train_loss": result.last_train_loss}
    if test.primary not in metrics:
        raise ChatforgeError(f"{name}: primary metric {test.primary!r} was not measured")

    meta = {"stage": name, "task": decl.task, "step": result.step, "tokens": result.tokens, "run": run.name,
            "parent": parent.record(run) if parent else None, **parts.meta}
    version = save_versioned(out, parts.save if parts.save is not None else model, tokenizer, meta)
    for file_name, content in test.files.items():
        if isinstance(content, str):
            with atomic_write(out.root / file_name) as fh:
                fh.write(content)
        else:
            write_jsonl(out.root / file_name, content)
    data = data_fingerprints(ctx.sources) if ctx.sources else \
        {"train": {"source": str(run.data / "train_*.bin"), "fingerprint": _fingerprint(run.train_shards())},
         "val": {"source": str(run.val_shard), "fingerprint": _fingerprint([run.val_shard])}}
    ev = {
        "schema": EVAL_SCHEMA, "stage": name, "task": decl.task, "version": version,
        "parent": parent.record(run) if parent else None, "data": data,
        "primary": {"name": test.primary, "value": metrics[test.primary], "goal": metric_goal(test.primary)},
        "metrics": metrics, "details": test.details,
        "train": {"steps": result.step, "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                  "train_time_s": round(result.wall_time_s, 2), "dtype": precision.name, "device": str(device),
                  "world_size": dist.world_size, "method": params["method"],
                  "trainable_params": params["trainable"], "total_params": params["total"], **parts.info},
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "versions": versions(),
    }
    write_json(out.eval, ev)
    register_version(run, out.model, ev, {name: dataclasses.asdict(f), "model": dataclasses.asdict(cfg.model)})
    return ev


def register_version(run: RunPaths, model_dir: Path, ev: dict[str, Any], config: dict[str, Any]) -> None:
    """Record the saved model in the runs directory's registry (``chatforge models``)."""
    from chatforge.registry import Registry, stage_record

    registry = Registry(run.root.parent)
    registry.register(stage_record(registry.runs_dir, run.name, model_dir, ev, config))
