"""Pre-training: next-token prediction on the token shards, through the one training loop.

Writes under ``runs/<name>/pretrain/``: ``ckpt/step_N/`` (resumable checkpoints),
``model/`` (the final weights + config + tokenizer, what later stages load),
``metrics.jsonl`` and ``eval.json`` (held-out loss, perplexity, bits per byte,
against the unigram baseline, the in-context copying probes of ``eval.probe``, and
samples). ``pretrain.init_from`` continues from
a model (e.g. mid-training) instead of a fresh one; the harness
(``train.stage``) does the shared work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.config import RunConfig
from chatforge.data.loader import TokenLoader, iter_eval_blocks
from chatforge.data.shard import open_shard, split_files
from chatforge.errors import ChatforgeError
from chatforge.eval.lm import evaluate_lm, token_byte_lengths, unigram_baseline
from chatforge.eval.probe import probe
from chatforge.model.generate import generate
from chatforge.train.dist import DistInfo
from chatforge.train.loop import TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest, run_stage, same_tokenizer

N_SAMPLES = 3
SAMPLE_PROMPT_TOKENS = 8


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


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    return model(x, y, loss_reduction="sum")[1], int((y != -1).sum())


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


def build(ctx: StageContext) -> StageParts:
    """Pre-training's part of the stage contract: token blocks from the run's shards, next-token loss,
    held-out loss / perplexity / bits per byte, samples, and the unigram baseline at the end."""
    run, t, tokenizer, model, device = ctx.run, ctx.section, ctx.tokenizer, ctx.backbone, ctx.device
    train_files, val_files = split_files(run.data, "train"), split_files(run.data, "val")
    if not train_files or not val_files:
        raise ChatforgeError(f"{run.data}: no train/val shards; run `chatforge data shard` (or the pipeline) first")
    block = model.config.block_size
    loader = TokenLoader(train_files, block, t.batch_size, seed=t.seed, rank=ctx.dist.rank,
                         world_size=ctx.dist.world_size)
    if loader.vocab_size != tokenizer.vocab_size:
        raise ChatforgeError(f"{run.data}: shards were written with a {loader.vocab_size}-token vocabulary, the "
                             f"model's tokenizer has {tokenizer.vocab_size}: re-run `chatforge data shard`")
    if ctx.parent and not same_tokenizer(ctx.parent.path / "tokenizer", run.tokenizer):
        raise ChatforgeError(f"pretrain.init_from: {ctx.parent.path} has another tokenizer than the run's shards "
                             f"({run.tokenizer}); continue pre-training on shards written with the model's tokenizer")
    token_bytes = token_byte_lengths(tokenizer)
    prompts = sample_prompts(val_files, tokenizer.bos_id)

    def evaluate(m: nn.Module) -> dict[str, float]:
        blocks = iter_eval_blocks(val_files, block, t.batch_size, t.eval_batches or None)
        return evaluate_lm(m, blocks, token_bytes, device)

    def sample(m: nn.Module) -> list[str]:
        if not prompts:
            return []
        outs = generate(m, prompts, t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed,
                        stop_tokens=[tokenizer.bos_id], device=device)
        return [tokenizer.decode(p[1:] + o) for p, o in zip(prompts, outs)]

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        baseline = unigram_baseline(train_files, val_files, tokenizer.vocab_size, token_bytes)
        # the copy and record-lookup probes: whether SFT can expect the model to read its context
        return StageTest(metrics={**baseline, **probe(m, tokenizer, seed=t.seed)}, primary="val_ppl",
                         details={"samples": result.samples})

    c = model.config
    ctx.say(f"pretrain: {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} "
            f"without embeddings), n_layer={c.n_layer} n_embd={c.n_embd} n_head={c.n_head} block_size={block}, "
            f"{ctx.precision.name} on {device}, {loader.tokens_per_epoch:,} train tokens per epoch"
            + (f", from {ctx.parent.path}" if ctx.parent else ""))
    return StageParts(model=model, batches=_DeviceBatches(loader, device), loss=lm_loss,
                      tokens_per_micro_batch=t.batch_size * block, evaluate=evaluate, sample=sample, test=test,
                      flops_per_token=model.flops_per_token())


def pretrain(cfg: RunConfig, resume: bool = False, progress: bool = True, dist: DistInfo | None = None
             ) -> dict[str, Any]:
    """Pre-train a GPT on the run's shards; returns its ``eval.json``."""
    return run_stage(cfg, "pretrain", resume=resume, progress=progress, dist=dist)
