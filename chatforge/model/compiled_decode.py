"""A compiled decode step: ``torch.compile`` of one new token per row through a fixed-shape cache.

At chatforge's sizes an eager decode step is a few hundred small ops (norms, RoPE,
smeared keys, the cache writes, masks), and their dispatch costs more than the matrix
products (``bench/generate.py``'s floor table). Inductor fuses the element-wise work
into a few C++ loops, and with its C++ wrapper (``cpp_wrapper``, on CPU) the step
calls them without one Python call per op: on 2 CPU cores this is the difference
between about 2 ms and 1 ms per step for a 4 x 256 model (numbers in the README).

One compiled graph needs fixed shapes, so (like gpt-fast's static cache):

- the decode step runs the model's own ``forward_hidden`` with a ``StepCache``, a
  cache whose per-step state is all tensors (the column each row writes, its RoPE
  position, which columns are real), updated in place inside the graph; nothing on
  the Python side changes from one step to the next, so the graph is reused;
- attention always covers every column of the cache; columns not written yet are
  masked out. ``bucket_len`` rounds the cache length up to a power of two so that
  calls with different prompt lengths share a few graphs, at the price of
  attending over a few unused (masked) columns.

The prefill (many tokens at once) stays eager here: it runs once per call, and a compiled
one needs a graph per padded prompt length. The serving engine, which prefills every
request, compiles it instead (``compiled_prefill.py``: 7.2 -> 3.1 ms for 185 tokens). The first call for a new batch
size or cache length compiles (tens of seconds on a CPU); later calls reuse it.
Compiling pays for long generations and for serving, not for one short reply, which
is why it is an option (``generate(..., compile=True)``) and not the default.
"""

from __future__ import annotations

from typing import Any

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.model.kv_cache import KVCache
from chatforge.model.quantize import is_quantized

__all__ = ["CompiledDecode", "StepCache", "bucket_len", "can_compile"]

MIN_BUCKET = 64
RECOMPILE_LIMIT = 64  # graphs per compiled function: (batch size, cache length, precision) combinations


def bucket_len(need: int, block_size: int) -> int:
    """The cache length for ``need`` columns: the next power of two >= need (at least MIN_BUCKET), at most
    the model's context."""
    n = MIN_BUCKET
    while n < need:
        n *= 2
    return max(need, min(n, block_size))


def can_compile(model: GPT) -> str | None:
    """Why ``model`` cannot take the compiled decode step, or None when it can."""
    if is_quantized(model):
        return "int8 weights (torch.ao dynamic quantisation) run eagerly"
    return None


class StepCache:
    """The cache protocol ``GPT.forward_hidden`` speaks (``prepare``/``update``/``commit``), for ONE new
    token per row inside a compiled graph.

    All of its state is tensors that the step updates in place: ``col`` (B,) the column each row
    writes, ``positions`` (B,) the RoPE position of its new token, ``valid`` (B, L) the columns that
    hold real tokens, ``k``/``v`` one (B, H_kv, L, D) tensor per layer and ``last`` (each smeared-key
    layer's last raw key). Each layer's keys are their own tensor, not a view of one big one: a graph
    that writes into a view of an input copies the whole input back, every step. ``pos`` is 0 so that
    ``forward_hidden`` skips its context check: the caller checks the real lengths, which a
    fixed-shape graph cannot see.
    """

    pos = 0

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], valid: torch.Tensor, col: torch.Tensor,
                 positions: torch.Tensor, last: dict[str, torch.Tensor]) -> None:
        self.k, self.v, self.valid, self.col, self.positions, self.last = k, v, valid, col, positions, last
        self.rows = torch.arange(valid.shape[0], device=valid.device)

    def previous_ok(self) -> torch.Tensor:
        return torch.ones(self.valid.shape[0], dtype=torch.bool, device=self.valid.device)

    def previous(self, name: str) -> torch.Tensor | None:
        return self.last.get(name)

    def remember(self, name: str, keys: torch.Tensor) -> None:
        self.last[name].copy_(keys[:, :, -1:])

    def prepare(self, n_new: int, padding_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if n_new != 1 or padding_mask is not None:
            raise ChatforgeError("StepCache: one new token per row, no padding mask")
        self.valid[self.rows, self.col] = True  # the new token sees itself
        return self.positions[:, None], self.valid[:, None, None, :], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl, vl = self.k[layer], self.v[layer]
        kl[self.rows, :, self.col] = k[:, :, 0].to(kl.dtype)  # advanced indices around a slice: (B, H, D)
        vl[self.rows, :, self.col] = v[:, :, 0].to(vl.dtype)
        return kl, vl

    def commit(self) -> None:
        self.col += 1
        self.positions += 1


def _decode(model: GPT, idx: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], valid: torch.Tensor,
            col: torch.Tensor, positions: torch.Tensor, last: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, vocab) fp32 logits of the next token; advances the cache state in place. The LM head runs
    outside autocast, in fp32, as ``generate.lm_logits`` runs it."""
    cache = StepCache(k, v, valid, col, positions, last)
    hidden = model.forward_hidden(idx, kv_cache=cache)[:, -1]
    with torch.autocast(hidden.device.type, enabled=False):
        return model.logits_from_hidden(hidden.float())


def compile_fixed_shapes(fn: Any, recompile_limit: int = RECOMPILE_LIMIT) -> Any:
    """``torch.compile(fn)`` with one graph per input shape (``dynamic=False``) and Inductor's C++ wrapper on
    CPU, as the compiled decode step and the compiled prefill use it. One compiled function serves every
    model: Dynamo keys its graphs by model, shapes and precision, so the recompile limit is raised to
    ``recompile_limit`` (the default, 8, would silently fall back to eager for a server or an eval that
    sees more combinations)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    options = {"cpp_wrapper": True} if not torch.cuda.is_available() else {}
    return torch.compile(fn, dynamic=False, options=options)


_compiled: Any = None


def _compiled_decode() -> Any:
    """Each (model, batch size, cache length, precision) is its own graph."""
    global _compiled
    if _compiled is None:
        _compiled = compile_fixed_shapes(_decode)
    return _compiled


class CompiledDecode:
    """The decode steps that follow an eager prefill into ``cache``: ``step(tokens)`` feeds one token per row
    and returns the next logits, like ``forward_hidden(tokens[:, None], kv_cache=cache)`` + the LM head.

    ``cache`` (a ``KVCache`` just after its prefill) gives the keys and values, copied once; it is not
    updated by the steps.
    """

    def __init__(self, model: GPT, cache: KVCache) -> None:
        if cache.k is None or cache.v is None or cache.pos == 0:
            raise ChatforgeError("CompiledDecode: prefill the cache first")
        self.model, self.max_len = model, cache.max_len
        device = cache.k.device
        B = cache.batch_size
        self.k = [t.clone() for t in cache.k.unbind(0)]  # one tensor per layer: see StepCache
        self.v = [t.clone() for t in cache.v.unbind(0)]
        self.valid = cache.valid.clone()
        self.col = torch.full((B,), cache.pos, dtype=torch.long, device=device)
        self.positions = cache.seen.clone()
        # fresh buffers: the prefill's are views of its own activations
        self.last = {name: t.clone() for name, t in cache.last.items()}
        self.written = cache.pos
        self._fn = _compiled_decode()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.written >= self.max_len:
            raise ChatforgeError(f"KV cache is full: {self.written} tokens cached, max_len={self.max_len}")
        logits = self._fn(self.model, tokens.reshape(-1, 1), self.k, self.v, self.valid, self.col, self.positions,
                          self.last)
        self.written += 1
        return logits
