"""Loader: ``(x, y)`` blocks from token shards, shuffled, resumable, with constant memory.

The shards are read as one token stream (their concatenation, in the order given),
memory-mapped so nothing is loaded until a block is read. The stream is cut into
``n_windows = (n_tokens - 1) // block_size`` non-overlapping windows; window ``w``
is the ``block_size + 1`` tokens starting at ``w * block_size`` (x is the first
``block_size``, y the last ``block_size``: the next-token targets). A window may
cross from one shard file into the next, like it crosses document boundaries (the
BOS tokens mark those).

Order: an infinite stream of samples. Sample ``p`` is window ``perm_e(p mod n)`` of
epoch ``e = p // n``, where ``perm_e`` is a pseudo-random bijection of ``[0, n)``
keyed by ``(seed, e)``: a Feistel network on the smallest even-bit power of two
``>= n``, with cycle-walking to stay inside ``[0, n)``. It costs O(1) memory for any
corpus size (no index array is ever built), and every window is seen exactly once
per epoch. Batches are consecutive runs of the sample stream, so the last batch of
an epoch simply continues into the next epoch's order: every batch is full.

Distributed: global batch ``g`` is samples ``[g*W*B, (g+1)*W*B)`` for ``W`` ranks of
batch ``B``; rank ``r`` takes the ``r``-th slice of ``B``. So ``W`` ranks together see
exactly what one process with batch ``W*B`` sees. The position is counted in
samples, so a run can resume with another batch size or number of ranks and still
continue the same stream without skipping or repeating windows.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.data.shard import open_shard, read_header
from chatforge.errors import ChatforgeError, DataError

STATE_VERSION = 1
_ROUNDS = 6  # Feistel rounds: 4 already make a strong pseudo-random permutation; 6 for margin


# --------------------------------------------------------------------------- permutation


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array: a fast, well-mixing 64-bit hash."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class IndexPermutation:
    """A keyed pseudo-random bijection of ``[0, n)`` in O(1) memory.

    ``perm(indices)`` maps an int array of indices in ``[0, n)`` to their images. A
    balanced Feistel network permutes ``[0, 4**h)`` (the smallest such domain with
    ``4**h >= n``, so at most 4x larger than ``n``); images that land outside
    ``[0, n)`` are pushed through the network again until they land inside
    ("cycle-walking"), which keeps it a bijection on ``[0, n)``.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0):
        if n < 1:
            raise ValueError(f"permutation size must be >= 1, got {n}")
        if n > 1 << 62:
            raise ValueError(f"permutation size {n} is larger than 2**62")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        digest = hashlib.blake2b(f"chatforge.loader:{seed}:{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
        self._keys = [np.uint64(int.from_bytes(digest[8 * i : 8 * i + 8], "little")) for i in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << h) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        x = np.asarray(indices, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise ValueError(f"index {int(x.max())} is outside [0, {self.n})")
        with np.errstate(over="ignore"):
            y = self._feistel(x)
            outside = y >= np.uint64(self.n)
            while outside.any():
                y[outside] = self._feistel(y[outside])
                outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


# --------------------------------------------------------------------------- token stream


class TokenStream:
    """Shard files read as one concatenated token stream, memory-mapped."""

    def __init__(self, files: Sequence[Path]):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ChatforgeError("no shard files given: run `chatforge data shard` first, or check the data path")
        headers = [read_header(f) for f in self.files]
        first = headers[0]
        for f, h in zip(self.files[1:], headers[1:]):
            if (h.vocab_size, h.bos_id) != (first.vocab_size, first.bos_id):
                raise DataError(
                    f"{f}: vocab_size {h.vocab_size} / bos_id {h.bos_id} differ from {self.files[0]}'s "
                    f"{first.vocab_size} / {first.bos_id}: shards from different tokenizers cannot be mixed"
                )
        self.vocab_size, self.bos_id = first.vocab_size, first.bos_id
        self.sizes = [h.n_tokens for h in headers]
        self.starts = [0]  # starts[i] = stream offset of file i's first token
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.n_tokens = self.starts[-1]
        self._maps = [open_shard(f) for f in self.files]

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` (1-D) with the ``len(out)`` tokens from stream offset ``start``."""
        i = bisect.bisect_right(self.starts, start) - 1
        filled = 0
        while filled < out.size:
            local = start + filled - self.starts[i]
            take = min(out.size - filled, self.sizes[i] - local)
            out[filled : filled + take] = self._maps[i][local : local + take]
            filled += take
            i += 1

    def windows(self, window_ids: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read windows as ``(x, y)`` int64 tensors of shape ``(len(window_ids), block_size)``."""
        buf = np.empty((len(window_ids), block_size + 1), dtype=np.int64)
        for row, w in enumerate(window_ids.tolist()):
            self.read_into(buf[row], w * block_size)
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def _count_windows(stream: TokenStream, block_size: int) -> int:
    if block_size < 1:
        raise ChatforgeError(f"block_size must be >= 1, got {block_size}")
    if stream.n_tokens < block_size + 1:
        names = ", ".join(f.name for f in stream.files)
        raise ChatforgeError(
            f"block_size {block_size} needs {block_size + 1} tokens per sample but the shards ({names}) hold "
            f"only {stream.n_tokens} tokens: use a smaller block_size or more data"
        )
    return (stream.n_tokens - 1) // block_size


# --------------------------------------------------------------------------- training loader


class TokenLoader:
    """Infinite, shuffled, resumable ``(x, y)`` batches for training; see the module docstring.

    Iterating yields int64 tensors of shape ``(batch_size, block_size)`` forever; the
    training loop decides when to stop. ``epoch`` advances once every window has been
    seen. ``state_dict()`` taken after any batch, loaded into a fresh loader over the
    same shards, continues with exactly the batches an uninterrupted loader yields.
    """

    def __init__(
        self,
        files: Sequence[Path],
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ChatforgeError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ChatforgeError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ChatforgeError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.stream = TokenStream(files)
        self.block_size = block_size
        self.n_windows = _count_windows(self.stream, block_size)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._sample = 0  # position in the infinite sample stream of the next global batch
        self._perm: IndexPermutation | None = None  # cached for the epoch being read
        self._perm_epoch = -1

    @property
    def vocab_size(self) -> int:
        return self.stream.vocab_size

    @property
    def epoch(self) -> int:
        """Epochs completed so far (windows of epoch ``e`` are samples ``[e*n, (e+1)*n)``)."""
        return self._sample // self.n_windows

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_windows * self.block_size

    def _permutation(self, epoch: int) -> IndexPermutation:
        if self._perm is None or self._perm_epoch != epoch:
            self._perm, self._perm_epoch = IndexPermutation(self.n_windows, self.seed, epoch), epoch
        return self._perm

    def window_ids(self, first_sample: int, count: int) -> np.ndarray:
        """Window indices of samples ``[first_sample, first_sample + count)`` of the stream."""
        samples = np.arange(first_sample, first_sample + count, dtype=np.int64)
        epochs, offsets = np.divmod(samples, self.n_windows)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._permutation(e)(offsets[sel])
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        mine = self._sample + self.rank * self.batch_size
        ids = self.window_ids(mine, self.batch_size)
        self._sample += self.world_size * self.batch_size  # before returning: state_dict() = after this batch
        return self.stream.windows(ids, self.block_size)

    def _files_state(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "tokens": n} for f, n in zip(self.stream.files, self.stream.sizes)]

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: plain JSON-able values, saved with each checkpoint."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self._sample % self.n_windows,  # samples into the current epoch
            "seed": self.seed,
            "block_size": self.block_size,
            "files": self._files_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the shards, block_size and seed must match the saved ones."""
        missing = [k for k in ("version", "epoch", "position", "seed", "block_size", "files") if k not in state]
        if missing:
            raise ChatforgeError(f"loader state is missing {', '.join(missing)}: not a TokenLoader state")
        if state["version"] != STATE_VERSION:
            raise ChatforgeError(f"loader state version {state['version']} is unknown (expected {STATE_VERSION})")
        if state["block_size"] != self.block_size:
            raise ChatforgeError(
                f"loader state was saved with block_size {state['block_size']}, this loader has {self.block_size}: "
                "resume with the same block_size"
            )
        if state["seed"] != self.seed:
            raise ChatforgeError(
                f"loader state was saved with seed {state['seed']}, this loader has {self.seed}: "
                "resume with the same seed"
            )
        if state["files"] != self._files_state():
            saved = ", ".join(f"{f['name']} ({f['tokens']} tokens)" for f in state["files"])
            ours = ", ".join(f"{f['name']} ({f['tokens']} tokens)" for f in self._files_state())
            raise ChatforgeError(
                f"loader state was saved over different shards: saved [{saved}], now [{ours}]; "
                "resume on the shards the run started with, or start a fresh run"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_windows:
            raise ChatforgeError(f"loader state has epoch {epoch}, position {position}: out of range")
        self._sample = epoch * self.n_windows + position


# --------------------------------------------------------------------------- evaluation


def iter_eval_blocks(
    files: Sequence[Path], block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential non-overlapping ``(x, y)`` blocks, the same on every call (for held-out loss).

    Windows are read in stream order; the last batch may be smaller than
    ``batch_size``. ``max_batches`` caps the number of batches (None: all windows).
    Bad arguments raise here, not at the first ``next()``.
    """
    if batch_size < 1:
        raise ChatforgeError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ChatforgeError(f"max_batches must be >= 1 or None, got {max_batches}")
    stream = TokenStream(files)
    n_windows = _count_windows(stream, block_size)
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(n_batches):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows), dtype=np.int64)
            yield stream.windows(ids, block_size)

    return blocks()
