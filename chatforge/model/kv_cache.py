"""A preallocated key/value cache so that decoding one token costs O(T), not O(T^2).

Layout: one ``(n_layer, B, n_kv_head, max_len, head_dim)`` tensor for keys and one
for values, filled left to right; ``pos`` counts the columns written so far. Every
row of the batch writes the same columns at each step, which keeps decoding a
plain slice-assign.

Prompts of different lengths are LEFT-PADDED: the prefill passes a
``padding_mask`` (True = real token), the cache remembers which columns are real
(``valid``) and how many real tokens each row has seen (``seen``). From these it
builds, for every forward step, the attention mask (a query sees real keys at or
before it, and always itself so that a pad query never has an empty row, which
would give NaN) and the RoPE position of each new token: its index among the
row's real tokens, the positions the row would get alone. (RoPE scores depend
only on position differences, so a constant shift would give the same result
in exact arithmetic; counting real tokens keeps the numbers identical and every
position inside the precomputed table.)
Left padding puts every row's last prompt token in the same column, so the first
sampled token of every row comes from one slice of the prefill output.
"""

from __future__ import annotations

import torch

from chatforge.errors import ChatforgeError


class KVCache:
    """Per-layer key/value tensors plus the bookkeeping for padded batches."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.max_len = max_len
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # dtype None: allocate on the first write with the dtype of the keys written
        # (bf16 under autocast, fp32 otherwise), so the cache never forces a cast.
        self.dtype = dtype
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        if dtype is not None:
            self._allocate(dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.pos = 0
        self.has_padding = False
        self._pending: tuple[int, torch.Tensor | None] | None = None
        self.last: dict[str, torch.Tensor] = {}  # per-row tensors of the last token written (smeared keys)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for ``model`` (a ``GPT``), on the model's device."""
        cfg = model.config
        device = next(model.parameters()).device
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, max_len, device=device, dtype=dtype)

    def _allocate(self, dtype: torch.dtype) -> None:
        shape = (self.n_layer, self.batch_size, self.n_kv_head, self.max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.dtype = dtype

    def reset(self) -> None:
        """Forget everything written; the buffers are kept for reuse."""
        self.valid.zero_()
        self.seen.zero_()
        self.pos = 0
        self.has_padding = False
        self._pending = None
        self.last = {}

    # ------------------------------------------------------------------ called by GPT

    def previous_ok(self) -> torch.Tensor | None:
        """(B,) whether the token before this step's first new one is a real token of the row; None
        before anything was written. Left padding keeps every row's last written column real."""
        return None if self.pos == 0 else self.valid[:, self.pos - 1]

    def previous(self, name: str) -> torch.Tensor | None:
        """The tensor kept under ``name`` for the last token written (see ``remember``)."""
        return self.last.get(name) if self.pos else None

    def remember(self, name: str, keys: torch.Tensor) -> None:
        """Keep each row's last column of this step's (B, H, T, D) raw keys of a layer (for smeared keys)."""
        self.last[name] = keys[:, :, -1:].detach()

    def prepare(
        self, n_new: int, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """Layout for writing ``n_new`` tokens: (positions, attention mask, is_causal).

        ``positions`` is None when it is simply ``pos .. pos+n_new-1`` for every row.
        The cache state changes only in ``commit`` (after all layers ran).
        """
        start, end = self.pos, self.pos + n_new
        if end > self.max_len:
            raise ChatforgeError(
                f"KV cache is full: {self.pos} tokens cached + {n_new} new > max_len={self.max_len}"
            )
        if padding_mask is not None:
            if padding_mask.shape != (self.batch_size, n_new):
                raise ChatforgeError(
                    f"padding_mask has shape {tuple(padding_mask.shape)}, expected ({self.batch_size}, {n_new})"
                )
            padding_mask = padding_mask.to(device=self.device, dtype=torch.bool)
            if bool(padding_mask.all()):
                padding_mask = None
        self._pending = (n_new, padding_mask)
        if not self.has_padding and padding_mask is None:
            # Every column real: the cheap layouts (flash attention needs mask=None).
            if n_new == 1:
                return None, None, False  # one query sees every cached key
            if start == 0:
                return None, None, True  # plain causal prefill
            keep = torch.ones(n_new, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
            return None, keep[None, None], False
        pm = padding_mask if padding_mask is not None else torch.ones(
            self.batch_size, n_new, dtype=torch.bool, device=self.device)
        valid = torch.cat([self.valid[:, :start], pm], dim=1)  # (B, end)
        q_idx = torch.arange(start, end, device=self.device)[:, None]
        k_idx = torch.arange(end, device=self.device)[None, :]
        mask = (valid[:, None, None, :] & (k_idx <= q_idx)) | (k_idx == q_idx)
        positions = (self.seen[:, None] + pm.long().cumsum(1) - 1).clamp(min=0)
        return positions, mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, H_kv, n_new, D) of ``layer``; return all so far."""
        if self.k is None:
            self._allocate(k.dtype)
        assert self.k is not None and self.v is not None
        if k.shape[0] != self.batch_size or k.shape[1] != self.n_kv_head or k.shape[3] != self.head_dim:
            raise ChatforgeError(
                f"KV cache was made for batch {self.batch_size}, {self.n_kv_head} kv heads of dim "
                f"{self.head_dim}; got keys of shape {tuple(k.shape)}"
            )
        start, end = self.pos, self.pos + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self) -> None:
        """Advance past the tokens of the last ``prepare`` once every layer has written them."""
        if self._pending is None:
            raise ChatforgeError("KVCache.commit called without a matching prepare")
        n_new, pm = self._pending
        start = self.pos
        if pm is None:
            self.valid[:, start:start + n_new] = True
            self.seen += n_new
        else:
            self.valid[:, start:start + n_new] = pm
            self.seen += pm.long().sum(1)
            self.has_padding = True
        self.pos += n_new
        self._pending = None
