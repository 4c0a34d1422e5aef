"""Data-parallel setup for ``torchrun``: which rank this process is, and collectives.

``torchrun --nproc_per_node N -m chatforge pretrain ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them the run is a single process and nothing here talks to
anyone. gloo is the backend on CPU, NCCL on CUDA. ``FSDPRun`` shards a model with FSDP2
(``train.parallel=fsdp``), ``checkpoint_blocks`` turns on activation checkpointing.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

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


# --------------------------------------------------------------------------- FSDP2 and activation checkpointing


class FSDPRun:
    """A model sharded in place with FSDP2 (``fully_shard``) for one training session.

    Every GPT block is its own FSDP unit, then every GPT (when it is not the root), then the
    trained module: a block's parameters are gathered just before its forward and backward
    and freed after, so a rank holds one block's full weights at a time, and its own
    ``1/W`` shard of every parameter, gradient and AdamW moment. The module objects stay the
    same (closures and ``task.backbone`` keep working while it trains); ``restore()`` turns
    them back into plain modules holding the full trained weights, so what runs after the
    loop (the stage's test, saving, sampling) sees an ordinary model.
    """

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from chatforge.model.gpt import GPT

        self.model = model
        self._names = {id(p): name for name, p in model.named_parameters()}
        # A copy with parameters on the meta device (no memory) and the buffers (RoPE tables): the
        # plain module layout restore() returns to. Made before fully_shard, which forbids deepcopy.
        memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                                for p in model.parameters()}
        try:
            self._template = copy.deepcopy(model, memo)
        except Exception as e:  # noqa: BLE001 - a module with an uncopyable attribute
            raise ChatforgeError(f"parallel=fsdp: cannot copy the layout of {type(model).__name__} ({e})") from e
        gpts = [m for m in model.modules() if isinstance(m, GPT)]
        for gpt in gpts:
            for block in gpt.blocks:
                fully_shard(block)
            if gpt is not model:
                fully_shard(gpt)
        fully_shard(model)
        for gpt in gpts:  # heads and losses call these directly, outside the module's forward
            for method in ("forward_hidden", "logits_from_hidden"):
                register_fsdp_forward_method(gpt, method)

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Optimizer groups built on the plain parameters, pointed at their sharded replacements."""
        now = dict(self.model.named_parameters())
        return [{**g, "params": [now[self._names[id(p)]] for p in g["params"]]} for g in groups]

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict on CPU, on rank 0 ({} on other ranks). Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0 ({} elsewhere), in ``optimizer.state_dict()``'s own
        layout (parameters numbered in group order), so a single process loads it. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:
            return {}
        index: dict[str, int] = {}
        groups = []
        for g in osd["param_groups"]:
            ids = []
            for fqn in g["params"]:
                index.setdefault(fqn, len(index))
                ids.append(index[fqn])
            groups.append({**g, "params": ids})
        return {"state": {index[fqn]: s for fqn, s in osd["state"].items()}, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load an ``optimizer.state_dict()``-layout state (from any world size) into the sharded optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): name for name, p in self.model.named_parameters()}
        fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        saved = [i for g in state["param_groups"] for i in g["params"]]
        if len(saved) != len(fqns):
            raise ChatforgeError(f"the checkpoint's optimizer holds {len(saved)} parameters, this model "
                                 f"trains {len(fqns)}: resume with the config it was trained with")
        to_fqn = dict(zip(saved, fqns))
        osd = {"state": {to_fqn[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [to_fqn[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, optimizer, osd, options=StateDictOptions(full_state_dict=True))

    def restore(self) -> None:
        """Gather the full weights on every rank and make every module plain again (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        device = next(iter(full.values())).device if full else torch.device("cpu")
        fresh: dict[int, nn.Parameter] = {}
        for name, p in self._template.named_parameters(remove_duplicate=False):
            if id(p) not in fresh and name in full:
                value = full[name]
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                fresh[id(p)] = nn.Parameter(value.detach().to(device).clone(), requires_grad=p.requires_grad)
        for name, b in self._template.named_buffers():  # persistent buffers as trained (GPT has none)
            if name in full:
                b.copy_(full[name])
        ours = dict(self.model.named_modules(remove_duplicate=False))
        theirs = dict(self._template.named_modules(remove_duplicate=False))
        if ours.keys() != theirs.keys():
            raise ChatforgeError("parallel=fsdp: the model's modules changed during training; cannot unshard")
        original = {id(t): ours[name] for name, t in theirs.items()}
        for t in theirs.values():
            for pname, p in t._parameters.items():
                if p is not None:
                    if id(p) not in fresh:
                        raise ChatforgeError(f"parallel=fsdp: no gathered weights for parameter {pname!r}")
                    t._parameters[pname] = fresh[id(p)]
        for name, t in theirs.items():
            mine = ours[name]
            state = dict(t.__dict__)
            state["_modules"] = {k: None if c is None else original[id(c)] for k, c in t._modules.items()}
            mine.__class__ = t.__class__
            mine.__dict__.clear()
            mine.__dict__.update(state)
        self._template = None


def checkpoint_blocks(model: nn.Module) -> Callable[[], None]:
    """Activation checkpointing: while training with gradients, every GPT block of ``model`` keeps
    only its input and recomputes its activations in backward (``torch.utils.checkpoint``,
    non-reentrant, so dropout replays the same masks). Memory for activations falls from every
    layer's to about one block's, for about a third more compute. Returns the undo."""
    from torch.utils.checkpoint import checkpoint

    from chatforge.model.gpt import GPT

    blocks = [b for m in model.modules() if isinstance(m, GPT) for b in m.blocks]
    for block in blocks:
        plain = block.forward

        def forward(*args: Any, _block: nn.Module = block, _plain: Callable = plain, **kwargs: Any) -> Any:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward

    def undo() -> None:
        for block in blocks:
            block.__dict__.pop("forward", None)

    return undo
