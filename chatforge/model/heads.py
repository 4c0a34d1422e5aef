"""Task heads over the GPT's final hidden states: scalar (reward / value) and classifier.

The LM head lives in ``GPT`` itself. These heads read ``GPT.forward_hidden`` output
(B, T, n_embd) together with an ``attention_mask`` (B, T), True/1 = real token,
0 = padding (Hugging Face's convention; left or right padding both work because
the backbone gets the same mask). Their weights start at zero so that a fresh
head predicts neutrally (reward 0, uniform class probabilities) and early
gradients do not shake the pre-trained backbone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, make_adamw

POOLINGS = ("last", "mean")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token; a row without one is an error."""
    mask = attention_mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        bad = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ChatforgeError(f"attention_mask rows {bad} have no real token to pool")
    T = mask.shape[1]
    return T - 1 - mask.flip(1).to(torch.uint8).argmax(dim=1)  # argmax = first True of the flipped row


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, C) summary of (B, T, C) hidden states: the last real token, or the mean of real tokens."""
    B, T, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    elif attention_mask.shape != (B, T):
        raise ChatforgeError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {T})")
    if pooling == "last":
        return hidden[torch.arange(B, device=hidden.device), last_token_index(attention_mask)]
    if pooling == "mean":
        m = attention_mask.to(hidden.dtype)[..., None]
        last_token_index(attention_mask)  # same empty-row check
        return (hidden * m).sum(1) / m.sum(1)
    raise ChatforgeError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class ScalarHead(nn.Module):
    """One number per position (``reduce="none"``: a PPO value head, (B, T)) or per
    sequence at its last real token (``reduce="last"``: a reward model, (B,)). fp32 out."""

    def __init__(self, n_embd: int, reduce: str = "last") -> None:
        super().__init__()
        if reduce not in ("last", "none"):
            raise ChatforgeError(f"ScalarHead reduce must be 'last' or 'none', got {reduce!r}")
        self.reduce = reduce
        self.proj = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.reduce == "last":
            hidden = pool(hidden, attention_mask, "last")
        return self.proj(hidden).squeeze(-1).float()


class ClassifierHead(nn.Module):
    """Logits over ``n_classes`` (B, n_classes) from the pooled sequence; fp32 out."""

    def __init__(self, n_embd: int, n_classes: int, pooling: str = "last", dropout: float = 0.0) -> None:
        super().__init__()
        if n_classes < 2:
            raise ChatforgeError(f"ClassifierHead needs n_classes >= 2, got {n_classes}")
        if pooling not in POOLINGS:
            raise ChatforgeError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(n_embd, n_classes)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.drop(pool(hidden, attention_mask, self.pooling))).float()


class GPTWithHead(nn.Module):
    """A GPT backbone feeding a task head; ``forward`` returns the head's output."""

    def __init__(self, backbone: GPT, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone.forward_hidden(idx, padding_mask=attention_mask)
        return self.head(hidden, attention_mask)

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                            device_type: str = "cpu", eps: float = 1e-8) -> torch.optim.AdamW:
        """AdamW over backbone and head, same decay rule as ``GPT.configure_optimizer``."""
        return make_adamw(self, weight_decay, lr, betas, device_type, eps)
