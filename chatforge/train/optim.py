"""Optimizers: AdamW, or Muon for the hidden matrices with AdamW for everything else.

Muon (Jordan et al. 2024, modded-nanogpt's record runs, nanochat's ``optim.py``) takes
SGD-momentum's update of a 2-D weight and replaces it by the nearest semi-orthogonal
matrix (all singular values 1), found by five Newton-Schulz iterations. Every direction
of the matrix then moves at the same rate, where Adam's update is dominated by a few
large singular directions. It only makes sense for matrices that map one hidden space to
another: the token embedding (a lookup table), the LM head (its rows are per-token
scores) and 1-D parameters (gains, key-smear mixes) stay with AdamW, as in both anchors.

``MuonAdamW`` is one ``torch.optim.Optimizer`` holding both kinds of group (each group's
``"kind"`` says which update it gets), so the training loop's LR schedule (``group["lr"]
= lr * group["lr_scale"]``), checkpoints (``state_dict``) and exact resume treat it like
AdamW. Muon's groups carry ``lr_scale = muon_lr / lr``: one schedule drives both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.gpt import make_adamw, param_groups

# The quintic Newton-Schulz coefficients of modded-nanogpt: chosen to push singular values
# towards 1 as fast as possible from anywhere in (0, 1], not to converge exactly (they end
# in ~[0.7, 1.2], which trains as well as exact orthogonalisation).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately ``U V^T`` of ``g = U S V^T`` (the semi-orthogonal factor), by Newton-Schulz."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: X X^T is the small Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with ``kind="muon"``, AdamW on groups with ``kind="adamw"`` (see the module docstring).

    Muon's step: ``m = beta m + (1 - beta) g``; Nesterov look-ahead ``u = g + beta (m - g)``;
    ``w -= lr * sqrt(max(1, rows / cols)) * orthogonalize(u)`` (the factor keeps the update's
    RMS per element the same for tall matrices); decoupled weight decay ``w *= 1 - lr * wd``.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16) -> None:
        for g in groups:
            if g.get("kind") not in ("muon", "adamw"):
                raise ChatforgeError(f"MuonAdamW: every group needs kind 'muon' or 'adamw', got {g.get('kind')!r}")
            if g["kind"] == "muon" and any(p.ndim != 2 for p in g["params"]):
                raise ChatforgeError("MuonAdamW: Muon groups hold 2-D matrices only")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, ns_steps=ns_steps)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ChatforgeError("MuonAdamW.step: closures are not supported")
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            grad = p.grad
            buf.lerp_(grad, 1 - beta)
            update = orthogonalize(grad.lerp(buf, beta), group["ns_steps"], self.ns_dtype)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, p.size(-2) / p.size(-1))))

    def _adamw(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))


def muon_param_groups(model: nn.Module, weight_decay: float, lr: float, muon_lr: float
                      ) -> list[dict[str, Any]]:
    """Groups for ``MuonAdamW``: the hidden matrices (every >= 2-D weight that is neither an
    embedding nor the LM head) to Muon, the rest to AdamW with ``param_groups``' decay split."""
    output = getattr(model, "output_weight", None)
    output_ids = {id(output)} if isinstance(output, torch.Tensor) else set()
    groups = param_groups(model, weight_decay)
    out: list[dict[str, Any]] = []
    for g in groups:
        if g["name"] == "decay":
            matrices = [p for p in g["params"] if p.ndim == 2 and id(p) not in output_ids]
            others = [p for p in g["params"] if p.ndim != 2 or id(p) in output_ids]
            if matrices:
                out.append({"params": matrices, "kind": "muon", "name": "muon", "weight_decay": 0.0,
                            "lr_scale": muon_lr / lr})
            if others:
                out.append({"params": others, "kind": "adamw", "name": "decay", "weight_decay": weight_decay})
        else:
            out.append({**g, "kind": "adamw"})
    return out


def make_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str, muon_lr: float = 0.02, section: str = "train") -> torch.optim.Optimizer:
    """The optimizer a ``TrainConfig`` asks for: ``adamw`` or ``muon`` (Muon + AdamW)."""
    if kind == "adamw":
        return make_adamw(model, weight_decay, lr, betas, device_type)
    if kind != "muon":
        raise ConfigError(f"{section}.optimizer: {kind!r} is not allowed; allowed: adamw, muon")
    if muon_lr <= 0:
        raise ConfigError(f"{section}.muon_lr: must be > 0, got {muon_lr}")
    groups = muon_param_groups(model, weight_decay, lr, muon_lr)
    if not groups:
        raise ChatforgeError("no trainable parameters: every parameter has requires_grad=False")
    # Newton-Schulz in bf16 where the hardware has it (CUDA, AMX/AVX-512-BF16 CPUs); emulated bf16
    # matmuls are many times slower than fp32 ones, so other CPUs iterate in fp32.
    from chatforge.device import cpu_has_fast_bf16

    fast_bf16 = device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16())
    return MuonAdamW(groups, lr=lr, betas=betas, ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
