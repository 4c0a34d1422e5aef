"""Data-parallel setup for ``torchrun``: which rank this process is, and collectives.

``torchrun --nproc_per_node N -m chatforge pretrain ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them the run is a single process and nothing here talks to
anyone. gloo is the backend on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from chatforge.errors import ChatforgeError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """The rank layout torchrun gave this process (a single process when not under torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ChatforgeError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from e
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def init_distributed(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device (its own GPU on CUDA)."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend)
    return device


def shutdown_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``value`` over ranks (itself for one process)."""
    if not info.enabled:
        return value
    value = value.clone()
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()
