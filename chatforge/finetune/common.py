"""Batching shared by the task-head stages (classification, tagging): an endless, resumable,
seeded order over a list of examples, sliced per rank under DDP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.train.dist import DistInfo


class ShuffledBatches:
    """Endless shuffled batches of task examples (classification, tagging): a resumable
    ``EpochShuffler`` order, this rank's slice of each global batch, made into tensors by ``collate``."""

    def __init__(self, examples: list[Any], batch_size: int, seed: int, collate: Callable[[list[Any]], dict[str, Any]],
                 dist: DistInfo | None = None):
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.dist = dist or DistInfo()
        self.order = EpochShuffler(len(examples), seed)

    def __next__(self) -> dict[str, Any]:
        return self.collate([self.examples[i] for i in self.order.take_rank(self.batch_size, self.dist)])

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.order.load_state_dict(s)


class EpochShuffler:
    """Endless, resumable order over ``n`` examples: a fresh seeded permutation each epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ChatforgeError("no training examples")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._make(0)

    def _make(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take_rank(self, k: int, dist: DistInfo) -> list[int]:
        """This rank's ``k`` of the next ``k * world_size`` indices: N ranks with batch k see exactly
        the examples one process with batch N * k sees, so a DDP run matches a single-process one."""
        ids = self.take(k * dist.world_size)
        return ids[dist.rank * k:(dist.rank + 1) * k]

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make(self.epoch)
            out.append(int(self._perm[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, s: dict[str, int]) -> None:
        if s["n"] != self.n or s["seed"] != self.seed:
            raise ChatforgeError(f"cannot resume: the checkpoint's data has {s['n']} examples (seed {s['seed']}), "
                                 f"this run has {self.n} (seed {self.seed}); resume on the same data")
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._make(self.epoch)
