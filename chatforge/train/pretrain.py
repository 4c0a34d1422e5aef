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
from chatforge.eval.probe import ordinary_ids, probe
from chatforge.model.generate import generate
from chatforge.train.dist import DistInfo
from chatforge.train.loop import TrainResult, grad_accum_steps
from chatforge.train.stage import StageContext, StageParts, StageTest, run_stage, same_tokenizer

N_SAMPLES = 3
SAMPLE_PROMPT_TOKENS = 8


def sample_prompts(val_files: list[Path], bos_id: int, n: int = N_SAMPLES,
                   length: int = SAMPLE_PROMPT_TOKENS) -> list[list[int]]:
    """Openings of the first held-out documents (BOS + a few tokens): samples then show
    whether the model continues text of the corpus's own kind, whatever the corpus is."""
    prompts: list[list[int]] = []
    window = 1 << 20  # search the memory-mapped shard in slices: a whole-file mask grows with the corpus
    for f in val_files:
        tokens = open_shard(f)
        for offset in range(0, len(tokens), window):
            for s in offset + np.flatnonzero(np.asarray(tokens[offset:offset + window]) == bos_id):
                doc = np.asarray(tokens[s:s + length + 1]).tolist()
                if len(doc) == length + 1 and bos_id not in doc[1:]:
                    prompts.append(doc)
                if len(prompts) == n:
                    return prompts
    return prompts


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    return model(x, y, loss_reduction="sum")[1], int((y != -1).sum())


class CopyDrill:
    """Copy-drill rows: each row is chunks of ``CHUNK`` tokens, and each chunk is segments of random
    ordinary tokens, each shown twice; the first copy is not trained on (nothing predicts it), the
    second is. Twice, not over and over: a model drilled on endless repeats learns to loop ("Quillon
    Quillon Quillon ..." in a fifth of the chat answers), one drilled on single repeats learns to copy
    once and then read on.

    Why: in-context copying (an induction head, Olsson et al. 2022) is what lets the chat model quote
    the customer's name and order number from its record, and the tiny model does not learn it from
    the corpus in its few hundred steps (the copy probe stays at 1.0). Random tokens can only be
    predicted by copying. Short chunks give each step many independent drills (measured on the tiny
    shape with tied embeddings: 16 chunks of 128 tokens per step copy after ~100 steps, 4 rows of 512
    after ~200). Row ``k`` of micro-batch ``n`` is a function of (seed, n, k): resuming gives the
    same rows.
    """

    CHUNK = 128
    MIN_SEGMENT, MAX_SEGMENT = 16, 32

    def __init__(self, ids: torch.Tensor, block: int, seed: int):
        self.ids, self.block, self.seed = ids, block, seed

    def rows(self, n: int, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        chunk = min(self.CHUNK, self.block + 1)
        hi = max(2, min(self.MAX_SEGMENT, chunk // 2))
        x = torch.empty(n, self.block, dtype=torch.long)
        y = torch.empty(n, self.block, dtype=torch.long)
        for k in range(n):
            seqs, masks, total = [], [], 0
            while total < self.block + 1:
                used = 0
                while used < chunk:  # the chunk: segments, each shown twice, until it is full
                    length = int(torch.randint(min(self.MIN_SEGMENT, hi), hi + 1, (1,), generator=g))
                    seg = self.ids[torch.randint(len(self.ids), (length,), generator=g)]
                    seqs.append(torch.cat([seg, seg]))
                    # not learnable: the first copy, and the second copy's first token (nothing says a
                    # repeat starts there); every later token of the second copy is
                    masks.append(torch.arange(2 * length) > length)
                    used += 2 * length
                seqs[-1], masks[-1] = seqs[-1][:len(seqs[-1]) - (used - chunk)], masks[-1][:len(masks[-1]) - (used - chunk)]
                total += chunk
            seq, learn = torch.cat(seqs)[:self.block + 1], torch.cat(masks)[:self.block + 1]
            x[k], y[k] = seq[:-1], torch.where(learn[1:], seq[1:], -1)
        return x, y


class _DeviceBatches:
    """The loader's batches moved to the training device (state passes through). With a drill, the
    first ``drill_batches`` micro-batches are all drill rows and later ones end in ``drill_rows``."""

    def __init__(self, loader: TokenLoader, device: torch.device, drill: CopyDrill | None = None,
                 drill_rows: int = 0, drill_batches: int = 0):
        self.loader, self.device, self.drill = loader, device, drill
        self.drill_rows, self.drill_batches = drill_rows, drill_batches
        self.batches = 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.loader)
        if self.drill is not None and self.batches < self.drill_batches:
            # all-drill micro-batch: the same tokens as rows of CHUNK (each chunk is one drill), so
            # attention starts spread over 128 positions, not 512: copying forms about twice as fast
            x, y = self.drill.rows(len(x), self.batches)
            if x.shape[1] % self.drill.CHUNK == 0:
                x, y = x.reshape(-1, self.drill.CHUNK), y.reshape(-1, self.drill.CHUNK)
        elif self.drill is not None and self.drill_rows:
            x, y = x.clone(), y.clone()
            x[-self.drill_rows:], y[-self.drill_rows:] = self.drill.rows(self.drill_rows, self.batches)
        self.batches += 1
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def state_dict(self) -> dict[str, Any]:
        return {**self.loader.state_dict(), "batches_served": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.batches = int(state.pop("batches_served", 0))
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

    drill_rows = round(t.copy_drill * t.batch_size)
    if t.copy_drill > 0 and drill_rows == 0:
        drill_rows = 1
    if drill_rows >= t.batch_size:
        raise ChatforgeError(f"pretrain.copy_drill: {t.copy_drill} of batch_size={t.batch_size} rows leaves no "
                             "corpus rows; lower it or raise the batch size")
    drill = None
    warmup_steps = round(t.copy_drill_warmup * t.max_steps)
    if drill_rows or warmup_steps:
        drill = CopyDrill(ordinary_ids(tokenizer), block, t.seed + ctx.dist.rank)
    accum = grad_accum_steps(t, t.batch_size * block, ctx.dist.world_size, "pretrain")

    c = model.config
    ctx.say(f"pretrain: {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} "
            f"without embeddings), n_layer={c.n_layer} n_embd={c.n_embd} n_head={c.n_head} block_size={block}, "
            f"{ctx.precision.name} on {device}, {loader.tokens_per_epoch:,} train tokens per epoch"
            + (f", from {ctx.parent.path}" if ctx.parent else "")
            + (f"; copy drills: every row of the first {warmup_steps} steps" if warmup_steps else "")
            + (f"; {drill_rows} of {t.batch_size} rows per micro-batch" if drill_rows else ""))
    batches = _DeviceBatches(loader, device, drill, drill_rows, warmup_steps * accum)
    return StageParts(model=model, batches=batches, loss=lm_loss,
                      tokens_per_micro_batch=t.batch_size * block, evaluate=evaluate, sample=sample, test=test,
                      flops_per_token=model.flops_per_token())


def pretrain(cfg: RunConfig, resume: bool = False, progress: bool = True, dist: DistInfo | None = None
             ) -> dict[str, Any]:
    """Pre-train a GPT on the run's shards; returns its ``eval.json``."""
    return run_stage(cfg, "pretrain", resume=resume, progress=progress, dist=dist)
