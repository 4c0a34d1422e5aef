"""Batches of rendered conversations for fine-tuning: packed or padded, shuffled, resumable.

Every batch is a dict of (B, T) tensors, T = ``block_size``:

    idx        input ids
    targets    next-token ids; -1 where the next token is in another conversation or padding
    loss_mask  True where the target is learned (an assistant token or its <|end|>)
    doc_ids    which conversation of the row each position belongs to; padding has an id
               of its own, so ``GPT.forward(doc_ids=...)`` never lets attention cross
               conversations and restarts RoPE positions at each one

A row is ``block_size + 1`` tokens: inputs are its first ``block_size``, targets its
last ``block_size`` (so a conversation of exactly ``block_size + 1`` tokens fills a
row). With ``pack=True`` each epoch's conversations are shuffled and placed first-fit
(each goes into the first row it fits in, opening a new row if none has room), which
wastes little space to padding without ever splitting a conversation. With
``pack=False`` each row holds one conversation, right-padded.

Order and resume: epoch ``e``'s rows come from a permutation seeded by ``(seed, e)``,
so they are the same on every run. Batches are consecutive rows; the last batch of
an epoch continues into the next one, so every batch is full. The state is
``(epoch, position)`` in rows, so a resume continues exactly where it stopped (with
any batch size). Distributed: a global batch is ``world_size * batch_size``
consecutive rows and rank ``r`` takes the ``r``-th slice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.chat.template import RenderedChat
from chatforge.errors import ChatforgeError

STATE_VERSION = 1


def first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices: each example, taken in ``order``, goes into the first row
    with ``capacity`` room left for it. O(n log n): a max-tree over the rows' free space
    finds the first row with room (rows not opened yet count as empty, and they open in
    index order, so the leftmost leaf with room is exactly the first-fit choice)."""
    n = len(order)
    size = 1
    while size < n:
        size *= 2
    free = [capacity] * (2 * size)  # free[node] = most room left in any row under node
    rows: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        if need > capacity:
            raise ChatforgeError(f"example {i} has {need} tokens, more than the row capacity {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(int(i))
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def collate(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], rows: Sequence[Sequence[int]], block_size: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch (see the module docstring) of ``rows``, each a list of indices into
    ``examples`` (``(ids, loss_mask)`` arrays) whose lengths sum to <= ``block_size + 1``."""
    width = block_size + 1
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    doc = np.empty((len(rows), width), dtype=np.int64)
    real = np.zeros((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        pos = 0
        for d, i in enumerate(row):
            ids, lm = examples[i]
            end = pos + len(ids)
            tokens[r, pos:end], mask[r, pos:end], doc[r, pos:end] = ids, lm, d
            pos = end
        doc[r, pos:] = len(row)  # padding: a document of its own
        real[r, :pos] = True
    # A target counts only inside the same conversation as its input and on a real token.
    keep = (doc[:, 1:] == doc[:, :-1]) & real[:, 1:]
    targets = np.where(keep, tokens[:, 1:], -1)
    return {
        "idx": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
        "targets": torch.from_numpy(targets),
        "loss_mask": torch.from_numpy(mask[:, 1:] & keep),
        "doc_ids": torch.from_numpy(np.ascontiguousarray(doc[:, :-1])),
    }


def _as_arrays(examples: Sequence[RenderedChat], block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if block_size < 1:
        raise ChatforgeError(f"block_size must be >= 1, got {block_size}")
    out = []
    for k, ex in enumerate(examples):
        if not isinstance(ex, RenderedChat):
            raise ChatforgeError(f"example {k} is a {type(ex).__name__}, not a RenderedChat (use chat.render)")
        if len(ex) > block_size + 1:
            raise ChatforgeError(
                f"example {k} has {len(ex)} tokens, more than block_size + 1 = {block_size + 1}; load the data "
                f"with max_tokens={block_size + 1} (chat.data truncates long conversations and counts them)"
            )
        out.append((np.asarray(ex.ids, dtype=np.int64), np.asarray(ex.loss_mask, dtype=bool)))
    return out


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ChatforgeError(f"batch_size must be >= 1, got {batch_size}")


class ChatBatches:
    """Endless, shuffled, resumable batches of conversations; see the module docstring.

    ``state_dict()`` taken after any batch, loaded into a fresh ``ChatBatches`` over the
    same examples and seed, continues with exactly the batches an uninterrupted one yields.
    """

    def __init__(
        self,
        examples: Sequence[RenderedChat],
        block_size: int,
        batch_size: int,
        seed: int = 0,
        pack: bool = True,
        pad_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_batch_size(batch_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ChatforgeError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.examples = _as_arrays(examples, block_size)
        if not self.examples:
            raise ChatforgeError("no chat examples to train on: the dataset is empty (or every conversation "
                                 "was dropped; see the data stats)")
        self.lengths = np.array([len(ids) for ids, _ in self.examples], dtype=np.int64)
        self.block_size, self.batch_size, self.seed, self.pack = block_size, batch_size, seed, pack
        self.pad_id, self.rank, self.world_size = pad_id, rank, world_size
        self.epoch, self.position = 0, 0  # rows of ``epoch`` already handed out
        self._rows: list[list[int]] = []
        self._rows_epoch = -1
        self._fingerprint: str | None = None

    @property
    def tokens_per_batch(self) -> int:
        """Input positions per batch on this rank (the loop's ``tokens_per_micro_batch``)."""
        return self.batch_size * self.block_size

    def rows(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s rows, each a list of example indices (cached for one epoch)."""
        if self._rows_epoch != epoch:
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            order = rng.permutation(len(self.examples))
            if self.pack:
                self._rows = first_fit(self.lengths, order, self.block_size + 1)
            else:
                self._rows = [[int(i)] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def fill_ratio(self, epoch: int = 0) -> float:
        """Fraction of the row tokens of ``epoch`` that are real (not padding)."""
        rows = self.rows(epoch)
        return float(self.lengths.sum()) / (len(rows) * (self.block_size + 1))

    def _take(self, count: int) -> list[list[int]]:
        """The next ``count`` rows of the endless stream; advances the position."""
        out: list[list[int]] = []
        while len(out) < count:
            rows = self.rows(self.epoch)
            take = rows[self.position : self.position + count - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= len(rows):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self._take(self.world_size * self.batch_size)
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return collate(self.examples, mine, self.block_size, self.pad_id)

    def fingerprint(self) -> str:
        """A hash of the examples (ids and masks), so a resume can tell it has the same data."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            for ids, lm in self.examples:
                h.update(np.int64(len(ids)).tobytes())
                h.update(ids.tobytes())
                h.update(lm.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """Where the iterator is: plain JSON-able values, saved with each checkpoint."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "block_size": self.block_size, "pack": self.pack, "examples": len(self.examples),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; examples, block_size, pack and seed must be the saved ones."""
        keys = ("version", "epoch", "position", "seed", "block_size", "pack", "examples", "fingerprint")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ChatforgeError(f"chat batch state is missing {', '.join(missing)}: not a ChatBatches state")
        if state["version"] != STATE_VERSION:
            raise ChatforgeError(f"chat batch state version {state['version']} is unknown (expected {STATE_VERSION})")
        for key in ("seed", "block_size", "pack"):
            if state[key] != getattr(self, key):
                raise ChatforgeError(f"chat batch state was saved with {key}={state[key]!r}, this run has "
                                     f"{getattr(self, key)!r}: resume with the same {key}")
        if state["examples"] != len(self.examples) or state["fingerprint"] != self.fingerprint():
            raise ChatforgeError(
                f"chat batch state was saved over different data ({state['examples']} examples, fingerprint "
                f"{state['fingerprint']}; now {len(self.examples)}, {self.fingerprint()}): resume with the "
                "dataset and tokenizer the run started with, or start a fresh run"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.rows(epoch)):
            raise ChatforgeError(f"chat batch state has epoch {epoch}, position {position}: out of range")
        self.epoch, self.position = epoch, position


def eval_batches(
    examples: Sequence[RenderedChat],
    block_size: int,
    batch_size: int,
    pack: bool = True,
    pad_id: int = 0,
    max_batches: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``examples`` once, in the given order (first-fit when packing): the
    same on every call, for held-out loss. The last batch may have fewer rows.
    Bad arguments raise here, not at the first ``next()``."""
    _check_batch_size(batch_size)
    if max_batches is not None and max_batches < 1:
        raise ChatforgeError(f"max_batches must be >= 1 or None, got {max_batches}")
    arrays = _as_arrays(examples, block_size)
    order = range(len(arrays))
    if pack:
        rows = first_fit([len(ids) for ids, _ in arrays], order, block_size + 1)
    else:
        rows = [[i] for i in order]
    starts = range(0, len(rows), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for s in starts:
            yield collate(arrays, rows[s : s + batch_size], block_size, pad_id)

    return batches()


def chat_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the learned tokens of ``batch``, and how many there are: the
    training loop's loss contract (it divides by the count over the whole step).

    Moves the batch to the model's device; ``model`` may be wrapped in DDP."""
    device = next(model.parameters()).device
    non_blocking = device.type == "cuda"
    b = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    total = model(b["idx"], b["targets"], loss_mask=b["loss_mask"], doc_ids=b["doc_ids"], loss_reduction="sum")[1]
    return total, (b["loss_mask"] & (b["targets"] != -1)).sum()
