"""Language-model evaluation: loss, perplexity and bits per byte on held-out tokens.

Perplexity depends on the tokenizer (a bigger vocabulary makes each prediction
harder but the text shorter), so it only compares models that share one. Bits per
byte divide the total loss by the number of UTF-8 bytes the targets stand for,
which compares runs with different tokenizers (nanochat does the same). Special
tokens stand for no text: they are left out of both sums for bits per byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.data.shard import open_shard


def token_byte_lengths(tokenizer: Any) -> torch.Tensor:
    """UTF-8 bytes each id stands for (0 for special tokens), shape (vocab_size,)."""
    lengths = [0 if tokenizer.is_special(i) else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


@torch.no_grad()
def evaluate_lm(model: nn.Module, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and bits per byte over ``(x, y)`` blocks."""
    total_nats, total_tokens = 0.0, 0
    byte_nats, total_bytes = 0.0, 0
    token_bytes = token_bytes.to(device)
    for x, y in blocks:
        x, y = x.to(device), y.to(device)
        _, per_token = model(x, y, loss_reduction="none")
        per_token = per_token.float()
        total_nats += float(per_token.sum())
        total_tokens += y.numel()
        nbytes = token_bytes[y]
        byte_nats += float((per_token * (nbytes > 0)).sum())
        total_bytes += int(nbytes.sum())
    if total_tokens == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    loss = total_nats / total_tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpb": byte_nats / (math.log(2) * total_bytes) if total_bytes else float("nan"),
        "val_tokens": total_tokens,
    }


def unigram_baseline(train_files: Sequence[Path], val_files: Sequence[Path], vocab_size: int,
                     token_bytes: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out loss/perplexity of the best context-free model: training-set token
    frequencies (add-one smoothed). A language model must beat this to have learned
    anything beyond word frequencies."""
    # Slices (262k tokens) of the memory-mapped shards, never a whole one: int64/float64 copies of a shard cost
    # ~28 bytes per token, so memory would grow with the corpus (bench/data_memory.py measures it).
    counts = np.zeros(vocab_size, dtype=np.float64)
    for f in train_files:
        for piece in _slices(open_shard(f)):
            counts += np.bincount(piece.astype(np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    nats, n, byte_nats, nbytes = 0.0, 0, 0.0, 0
    lengths = token_bytes.numpy() if token_bytes is not None else None
    for f in val_files:
        for val in _slices(open_shard(f), skip_first=True):  # targets: every token after the first
            nll = -logp[val]
            nats += float(nll.sum())
            n += val.size
            if lengths is not None:
                b = lengths[val]
                byte_nats += float(nll[b > 0].sum())
                nbytes += int(b.sum())
    loss = nats / max(n, 1)
    out = {"unigram_loss": loss, "unigram_ppl": math.exp(min(loss, 700.0))}
    if nbytes:
        out["unigram_bpb"] = byte_nats / (math.log(2) * nbytes)
    return out


def _slices(tokens: np.ndarray, skip_first: bool = False, size: int = 1 << 18) -> Iterable[np.ndarray]:
    """Consecutive int64 copies of at most ``size`` tokens of a (memory-mapped) token array."""
    for start in range(1 if skip_first else 0, len(tokens), size):
        yield np.asarray(tokens[start:start + size], dtype=np.int64)


def _blocks_from_tokens(tokens: torch.Tensor, block_size: int, batch_size: int, max_batches: int | None
                        ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping ``(x, y)`` windows of a 1-D token tensor, in order."""
    n = (tokens.numel() - 1) // block_size
    starts = torch.arange(n) * block_size
    batches = [starts[i:i + batch_size] for i in range(0, n, batch_size)]
    for b in batches[:max_batches]:
        rows = torch.stack([tokens[s:s + block_size + 1] for s in b.tolist()])
        yield rows[:, :-1], rows[:, 1:]


def perplexity(model: nn.Module, tokenizer: Any, text: str | None = None, shards: Sequence[str] | None = None,
               block_size: int | None = None, batch_size: int = 8, max_batches: int | None = None,
               device: torch.device | str = "cpu", text_field: str = "text") -> dict[str, float]:
    """Held-out metrics of ``model`` on a text source (any format ``collect`` reads) or on token shards."""
    from chatforge.config import CollectConfig
    from chatforge.data.collect import iter_documents
    from chatforge.data.loader import iter_eval_blocks
    from chatforge.data.shard import read_header
    from chatforge.errors import ChatforgeError, DataError

    context = model.config.block_size
    block_size = block_size or context
    if block_size > context:
        raise ChatforgeError(f"--block-size {block_size} is larger than the model's context "
                             f"(block_size={context}); use at most {context}")
    token_bytes = token_byte_lengths(tokenizer)
    if shards:
        files = [Path(s) for s in shards]
        for f in files:
            header = read_header(f)
            if header.vocab_size != tokenizer.vocab_size:
                raise DataError(f"{f}: shard was written with a {header.vocab_size}-token vocabulary, the model's "
                                f"tokenizer has {tokenizer.vocab_size}: shard the text with this tokenizer")
        blocks = iter_eval_blocks(files, block_size, batch_size, max_batches)
    else:
        ids: list[int] = []
        for doc in iter_documents(text, CollectConfig(text_field=text_field)):
            ids.append(tokenizer.bos_id)
            ids.extend(tokenizer.encode(doc["text"]))
        if len(ids) < block_size + 1:
            raise DataError(f"{text}: only {len(ids)} tokens, fewer than one block of {block_size + 1}; "
                            "give more text or a smaller --block-size")
        blocks = _blocks_from_tokens(torch.tensor(ids, dtype=torch.long), block_size, batch_size, max_batches)
    model.eval()
    return evaluate_lm(model, blocks, token_bytes, device)
