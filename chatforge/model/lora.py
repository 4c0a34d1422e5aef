"""Parameter-efficient fine-tuning: LoRA adapters and layer freezing, written by hand.

We do not use the Hugging Face ``peft`` package: it targets ``transformers``
models (their configs, module naming and ``PreTrainedModel`` hooks), and
chatforge's GPT is a plain ``nn.Module``. What LoRA needs is small enough to own:

- ``LoRALinear`` wraps one ``nn.Linear``: ``y = W x + (alpha / r) * B A dropout(x)``
  with ``W`` frozen, ``A`` (r x in) Kaiming-uniform and ``B`` (out x r) zero, so the
  wrapped model starts out computing exactly what the base model did (Hu et al.,
  2021; the init and scaling follow the reference ``loralib`` and ``peft``).
- ``apply_lora`` swaps matching Linear layers for wrappers and freezes the rest;
  ``merge_lora`` folds ``B A`` back into ``W`` and removes the wrappers, so the
  exported state dict has the plain GPT's keys and loads into a plain GPT.
- ``freeze`` is the other classic recipe: train the whole model except the
  embeddings, the first N blocks, or everything but the head.

The training loop's optimizer (``make_adamw``) skips parameters with
``requires_grad=False``, so freezing here is all it takes to train only the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from chatforge.errors import ConfigError
from chatforge.model.gpt import GPT

FREEZE_SPECS = ("none", "embeddings", "blocks:N", "backbone")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (kept as ``self.base``, frozen) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"LoRA r: must be an integer >= 1, got {r!r}")
        if not alpha > 0:
            raise ConfigError(f"LoRA alpha: must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout: must be in [0, 1), got {dropout!r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        # Same init as nn.Linear (and loralib/peft): A random so that B gets a gradient,
        # B zero so that the update B A starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B @ A`` (out x in), in the base weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return y
        # x A^T B^T rather than x (B A)^T: two thin matmuls, never an out x in matrix.
        update = self.dropout(x) @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)
        return y + update * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (for inference: one matmul, no LoRA path)."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (up to rounding), so that training can go on."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _trainable_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    modules = []
    for name in names:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(
                f"trainable: {name!r} is not a submodule of {type(model).__name__}; "
                f"its top-level modules are: {children}"
            ) from None
    return modules


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = ("c_q", "c_v"),
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    trainable: Sequence[str] = (),
) -> list[str]:
    """Wrap every ``nn.Linear`` whose last name component is in ``targets`` (``c_q``
    matches ``blocks.0.attn.c_q``, ``blocks.1.attn.c_q``, ...) in a ``LoRALinear``,
    then freeze every parameter except the LoRA ones and those of the submodules
    named in ``trainable`` (full dotted names, e.g. ``["head"]`` for a GPTWithHead).

    Returns the full names of the wrapped layers. Each target must match at least
    one layer, so a typo is an error rather than a silently smaller adapter.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ConfigError(f"LoRA targets: empty; choose among the Linear layers: {', '.join(_linear_names(model))}")
    already = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if already:
        raise ConfigError(f"LoRA is already applied to this model ({', '.join(already)}); merge_lora() it first")
    # GPT computes logits from ``lm_head.weight`` directly (F.linear, shared with the
    # tied case), so a wrapper there would never run: refuse rather than train nothing.
    bypassed = {id(m.lm_head) for m in model.modules() if isinstance(m, GPT) and m.lm_head is not None}
    matches: dict[str, list[str]] = {t: [] for t in targets}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and last in matches:
            if id(module) in bypassed:
                raise ConfigError(
                    f"LoRA target {last!r}: the GPT reads {name}.weight directly, so an adapter there would "
                    f"never run; train it fully instead with trainable=[{name!r}]"
                )
            matches[last].append(name)
    missing = [t for t, names in matches.items() if not names]
    if missing:
        raise ConfigError(
            f"LoRA targets {missing} match no nn.Linear layer; the Linear layers' names are: "
            f"{', '.join(_linear_names(model))}"
        )
    keep = _trainable_modules(model, trainable)
    wrapped = sorted(name for names in matches.values() for name in names)
    for name in wrapped:
        _set_module(model, name, LoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in wrapped:
        lora = model.get_submodule(name)
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
    for module in keep:
        for p in module.parameters():
            p.requires_grad_(True)
    return wrapped


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA update into its base weight and put the plain ``nn.Linear``
    back in place, so ``model.state_dict()`` has the original keys again (for export,
    or loading into a model without LoRA). Returns the merged layers' names (empty if
    there were none). The merged weights keep ``requires_grad=False``."""
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        lora = model.get_submodule(name)
        lora.merge()
        _set_module(model, name, lora.base)
    return names


# --------------------------------------------------------------------------- freezing


def _backbone_and_head(model: nn.Module) -> tuple[GPT, nn.Module | None]:
    """The GPT inside ``model`` and the task head (None for a plain GPT)."""
    if isinstance(model, GPT):
        return model, None
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if isinstance(backbone, GPT) and isinstance(head, nn.Module):
        return backbone, head
    raise ConfigError(f"freeze: expected a GPT or a GPTWithHead (backbone + head), got {type(model).__name__}")


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Freeze part of a GPT or GPTWithHead; returns the names of the frozen parameters.

    ``spec``:
    - ``"none"``: everything trains;
    - ``"embeddings"``: the token embedding is frozen (with tied embeddings that is
      also the LM head);
    - ``"blocks:N"``: the embedding and the first N transformer blocks are frozen
      (the lower layers hold the most general features; the top ones adapt);
    - ``"backbone"``: only the head trains: ``model.head`` for a GPTWithHead, the LM
      head ``lm_head`` for a plain GPT (an error when it is tied to the embedding).

    Every parameter is first made trainable, so the spec alone decides what trains.
    LoRA models are refused: ``apply_lora`` already chose what trains.
    """
    gpt, head = _backbone_and_head(model)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("freeze: this model has LoRA layers, and apply_lora already froze all but the adapters; "
                          "use apply_lora(..., trainable=[...]) to keep other modules trainable")
    allowed = f"allowed: {', '.join(FREEZE_SPECS)} (N = 0..{gpt.config.n_layer})"
    if not isinstance(spec, str):
        raise ConfigError(f"freeze spec: expected a string, got {spec!r}; {allowed}")
    frozen_modules: list[nn.Module]
    if spec == "none":
        frozen_modules = []
    elif spec == "embeddings":
        frozen_modules = [gpt.wte]
    elif spec.startswith("blocks:"):
        n_text = spec.split(":", 1)[1].strip()
        if not (n_text.isascii() and n_text.isdigit()) or int(n_text) > gpt.config.n_layer:
            raise ConfigError(
                f"freeze spec {spec!r}: N must be an integer from 0 to n_layer={gpt.config.n_layer}; {allowed}"
            )
        frozen_modules = [gpt.wte, *gpt.blocks[: int(n_text)]]
    elif spec == "backbone":
        if head is None:
            if gpt.lm_head is None:
                raise ConfigError(
                    "freeze spec 'backbone': this GPT ties its LM head to the token embedding "
                    "(tie_embeddings=True), so there is no separate head to train; use 'blocks:N'"
                )
            frozen_modules = [m for name, m in gpt.named_children() if name != "lm_head"]
        else:
            frozen_modules = [m for _, m in model.named_children() if m is not head]
    else:
        raise ConfigError(f"freeze spec {spec!r} is not known; {allowed}")
    for p in model.parameters():
        p.requires_grad_(True)
    frozen_ids = set()
    for module in frozen_modules:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
    return [name for name, p in model.named_parameters() if id(p) in frozen_ids]


# --------------------------------------------------------------------------- accounting


def param_summary(model: nn.Module) -> dict[str, Any]:
    """``{"trainable", "total", "fraction"}``: parameter counts, each shared tensor once."""
    params = list(model.parameters())  # nn.Module.parameters() already lists tied tensors once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}


def format_param_summary(summary: dict[str, Any] | nn.Module) -> str:
    """One line for logs, e.g. ``trainable params: 2,048 / 120,896 (1.69%)``."""
    if isinstance(summary, nn.Module):
        summary = param_summary(summary)
    return (f"trainable params: {summary['trainable']:,} / {summary['total']:,} "
            f"({100 * summary['fraction']:.2f}%)")
