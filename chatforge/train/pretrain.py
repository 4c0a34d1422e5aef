"""Pre-training: next-token prediction on the token shards, through the one training loop.

Writes under ``runs/<name>/pretrain/``: ``ckpt/step_N/`` (resumable checkpoints),
``model/`` (the final weights + config + tokenizer, what later stages load),
``metrics.jsonl`` and ``eval.json`` (held-out loss, perplexity, bits per byte,
against the unigram baseline, and samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.config import ModelConfig, RunConfig
from chatforge.data.loader import TokenLoader, iter_eval_blocks
from chatforge.data.shard import open_shard, split_files
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.eval.lm import evaluate_lm, token_byte_lengths, unigram_baseline
from chatforge.io import write_json
from chatforge.model.generate import generate
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train.checkpoint import save_model
from chatforge.train.dist import DistInfo, dist_from_env, init_distributed
from chatforge.train.loop import TrainTask, seed_everything, train
from chatforge.train.precision import resolve_device, resolve_precision

N_SAMPLES = 3
SAMPLE_PROMPT_TOKENS = 8


def gpt_config(m: ModelConfig, vocab_size: int) -> GPTConfig:
    """The GPT shape a ``[model]`` section describes, for a tokenizer of ``vocab_size``."""
    overrides: dict[str, Any] = {
        "mlp_ratio": m.mlp_ratio, "tie_embeddings": m.tie_embeddings, "qk_norm": m.qk_norm,
        "dropout": m.dropout, "logit_softcap": m.logit_softcap, "rope_theta": m.rope_theta,
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


@dataclass(frozen=True)
class PretrainPaths:
    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"


def sample_prompts(val_files: list[Path], bos_id: int, n: int = N_SAMPLES,
                   length: int = SAMPLE_PROMPT_TOKENS) -> list[list[int]]:
    """Openings of the first held-out documents (BOS + a few tokens): samples then show
    whether the model continues text of the corpus's own kind, whatever the corpus is."""
    prompts: list[list[int]] = []
    for f in val_files:
        tokens = np.asarray(open_shard(f))
        starts = np.flatnonzero(tokens == bos_id)
        for s in starts:
            doc = tokens[s:s + length + 1].tolist()
            if len(doc) == length + 1 and bos_id not in doc[1:]:
                prompts.append(doc)
            if len(prompts) == n:
                return prompts
    return prompts


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


class _DeviceBatches:
    """The loader's batches moved to the training device (state passes through)."""

    def __init__(self, loader: TokenLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.loader)
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def pretrain(cfg: RunConfig, resume: bool = False, progress: bool = True, dist: DistInfo | None = None
             ) -> dict[str, Any]:
    """Pre-train a GPT on the run's shards; returns the metrics written to ``eval.json``."""
    from chatforge.pipeline import paths
    from chatforge.tokenizer import load_tokenizer

    run = paths(cfg)
    out = PretrainPaths(run.pretrain)
    t = cfg.pretrain
    dist = dist or dist_from_env()
    device = init_distributed(dist, resolve_device(t.device))
    precision = resolve_precision(t.dtype, device)

    tokenizer = load_tokenizer(run.tokenizer)
    train_files, val_files = split_files(run.data, "train"), split_files(run.data, "val")
    if not train_files or not val_files:
        raise ChatforgeError(f"{run.data}: no train/val shards; run `chatforge data shard` (or the pipeline) first")
    model_cfg = gpt_config(cfg.model, tokenizer.vocab_size)
    loader = TokenLoader(train_files, model_cfg.block_size, t.batch_size, seed=t.seed, rank=dist.rank,
                         world_size=dist.world_size)
    if loader.vocab_size != tokenizer.vocab_size:
        raise ChatforgeError(f"{run.data}: shards were written with a {loader.vocab_size}-token vocabulary, the "
                             f"tokenizer in {run.tokenizer} has {tokenizer.vocab_size}: re-run `chatforge data shard`")

    seed_everything(t.seed)  # same initial weights on every rank
    model = GPT(model_cfg).to(device)
    token_bytes = token_byte_lengths(tokenizer)
    prompts = sample_prompts(val_files, tokenizer.bos_id)

    def evaluate(m: nn.Module) -> dict[str, float]:
        blocks = iter_eval_blocks(val_files, model_cfg.block_size, t.batch_size, t.eval_batches or None)
        return evaluate_lm(m, blocks, token_bytes, device)

    def sample(m: nn.Module) -> list[str]:
        if not prompts:
            return []
        outs = generate(m, prompts, t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed,
                        stop_tokens=[tokenizer.bos_id], device=device)
        return [tokenizer.decode(p[1:] + o) for p, o in zip(prompts, outs)]

    task = TrainTask(
        name="pretrain", model=model, tokenizer=tokenizer, batches=_DeviceBatches(loader, device), loss=lm_loss,
        tokens_per_micro_batch=t.batch_size * model_cfg.block_size, evaluate=evaluate, sample=sample,
        flops_per_token=model.flops_per_token(), meta={"dtype": precision.name},
    )
    if dist.is_main and progress:
        print(f"pretrain: {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} "
              f"without embeddings), n_layer={model_cfg.n_layer} n_embd={model_cfg.n_embd} "
              f"n_head={model_cfg.n_head} block_size={model_cfg.block_size}, {precision.name} on {device}, "
              f"{loader.tokens_per_epoch:,} train tokens per epoch")
    result = train(task, t, out.root, precision, dist, resume=resume, section="pretrain", progress=progress)

    metrics: dict[str, Any] = {}
    if dist.is_main:
        save_model(out.model, model, tokenizer, {"stage": "pretrain", "step": result.step, "tokens": result.tokens})
        baseline = unigram_baseline(train_files, val_files, tokenizer.vocab_size, token_bytes)
        metrics = {
            **result.eval, **baseline,
            "steps": result.step, "train_tokens": result.tokens, "final_train_loss": result.last_train_loss,
            "wall_time_s": round(result.wall_time_s, 2),
            "tokens_per_s": round(result.tokens / max(result.wall_time_s, 1e-9), 1),
            "params": model.num_params(), "dtype": precision.name, "device": str(device),
            "world_size": dist.world_size, "samples": result.samples,
        }
        write_json(out.eval, metrics)
    return metrics
