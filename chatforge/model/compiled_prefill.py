"""A compiled prefill: ``torch.compile`` of one prompt's whole forward, padded to a few length buckets.

A served request's prompt is its largest single piece of work: about 185 tokens for a
SupportWorld conversation, against about 60 generated ones. In eager mode a prefill of a
small model is mostly element-wise ops (norms, ReLU², RoPE, smeared keys, casts), each
one pass over memory; Inductor fuses them into a few C++ loops. On a 2-core Xeon in bf16
a 185-token prefill of the tiny preset's model takes 7.2 ms eagerly and 3.1 ms compiled
(padded to 192).

One graph needs fixed shapes, so prompts are RIGHT-padded to a bucket length
(``prefill_bucket``). The forward is causal, so a real token never attends to the padding
after it: the real positions' hidden states, keys and values are those of the unpadded
prompt (up to fused-kernel rounding). The caller keeps only the first ``T`` columns.

Each bucket compiles once per model and precision (about 10 s on a 2-core CPU; Inductor's
on-disk cache makes a later process faster), so ``warm_up`` compiles them all up front:
a server pays at start, not on some user's first long prompt. Dynamic-shape compilation
(one graph for every length) was measured too: 5.0 ms for the same prompt, so buckets win.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chatforge.model.compiled_decode import compile_fixed_shapes
from chatforge.model.gpt import GPT

__all__ = ["PrefillOutput", "compiled_prefill", "prefill_bucket", "prefill_buckets", "warm_up"]

BUCKET = 64  # prompts up to 256 tokens are padded to a multiple of this
RECOMPILE_LIMIT = 64  # graphs of the compiled function: (model, bucket, precision) combinations


def prefill_bucket(n: int, block_size: int) -> int:
    """The padded length for an ``n``-token prompt: a multiple of 64 up to 256 tokens, then a multiple of a
    quarter of the next power of two (so padding stays under about a third), never past the context."""
    step = BUCKET
    while step * 4 < n:
        step *= 2
    return min(-(-n // step) * step, block_size)


def prefill_buckets(block_size: int) -> list[int]:
    """Every length ``prefill_bucket`` returns for prompts of 1 .. block_size tokens."""
    out: list[int] = []
    n = 1
    while n <= block_size:
        b = prefill_bucket(n, block_size)
        out.append(b)
        n = b + 1
    return out


class _Collect:
    """The cache protocol ``GPT.forward_hidden`` speaks, recording what a prefill would write: each layer's
    keys and values, and each smeared-key layer's raw keys (the caller picks the last REAL column)."""

    pos = 0

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.raw: dict[str, torch.Tensor] = {}

    def previous_ok(self) -> None:
        return None  # a prompt starts its row: its first token has no predecessor

    def previous(self, name: str) -> None:
        return None

    def remember(self, name: str, keys: torch.Tensor) -> None:
        self.raw[name] = keys

    def prepare(self, n_new: int, padding_mask: torch.Tensor | None) -> tuple[None, None, bool]:
        return None, None, n_new > 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.append(k)
        self.v.append(v)
        return k, v

    def commit(self) -> None:
        pass


def _prefill(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                                                     dict[str, torch.Tensor]]:
    cache = _Collect()
    hidden = model.forward_hidden(idx, kv_cache=cache)
    return hidden, cache.k, cache.v, cache.raw


_compiled: Any = None


def _compiled_prefill() -> Callable[..., Any]:
    """Each (model, bucket, precision) is its own graph."""
    global _compiled
    if _compiled is None:
        _compiled = compile_fixed_shapes(_prefill, RECOMPILE_LIMIT)
    return _compiled


@dataclass
class PrefillOutput:
    """One prompt's prefill, cut back to its ``T`` real tokens."""

    hidden: torch.Tensor  # (1, C): the last prompt token's final hidden state (feed it to the LM head)
    k: list[torch.Tensor]  # per layer (1, H_kv, T, D): the keys to cache (after RoPE and smearing)
    v: list[torch.Tensor]  # per layer (1, H_kv, T, D)
    last: dict[str, torch.Tensor]  # per smeared-key layer (1, H_kv, 1, D): the last token's raw key


def compiled_prefill(model: GPT, prompt: list[int]) -> PrefillOutput:
    """The prefill of one prompt through the compiled forward; call it under ``no_grad`` and the engine's
    autocast, as the eager forward runs."""
    T = len(prompt)
    Tb = prefill_bucket(T, model.config.block_size)
    device = model.rope_cos.device
    idx = torch.zeros(1, Tb, dtype=torch.long)
    idx[0, :T] = torch.tensor(prompt, dtype=torch.long)
    hidden, ks, vs, raw = _compiled_prefill()(model, idx.to(device))
    return PrefillOutput(hidden[:, T - 1], [k[:, :, :T] for k in ks], [v[:, :, :T] for v in vs],
                         {name: keys[:, :, T - 1:T] for name, keys in raw.items()})


def warm_up(model: GPT, log: Callable[[str], None] | None = None) -> float:
    """Compile every bucket for ``model`` in the current precision (call it inside the same ``no_grad`` and
    autocast region as later prefills); returns the seconds it took."""
    t0 = time.perf_counter()
    for n in prefill_buckets(model.config.block_size):
        t = time.perf_counter()
        compiled_prefill(model, [0] * n)
        if log is not None:
            log(f"compiled the prefill for prompts of up to {n} tokens in {time.perf_counter() - t:.1f} s")
    return time.perf_counter() - t0
