"""FLOP counts and model FLOPs utilisation (MFU), as in PaLM (arXiv:2204.02311) and nanochat.

Training one token costs about 6 FLOPs per parameter it is multiplied with (2 in
the forward pass, 4 in the backward), plus the attention scores and the weighted
sum, 12 * n_layer * n_head * head_dim * seq_len. "Multiplied with" means every
matrix of the blocks and the LM head, but not the embedding lookup; a tied
embedding still costs its LM-head matmul, so it is counted once here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:  # gpt.py imports this module, so the config type is for checkers only
    from chatforge.model.gpt import GPTConfig

# Dense bf16 tensor-core peak FLOP/s (no sparsity) by substring of the CUDA device
# name, most specific first. Unknown devices (and CPUs) have no known peak: MFU is
# then not reported rather than made up.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def matmul_params(config: GPTConfig) -> int:
    """Weights multiplied per token: attention and MLP matrices of all layers, plus the LM head."""
    c, hd = config.n_embd, config.head_dim
    attn = c * config.n_head * hd * 2 + c * config.n_kv_head * hd * 2  # q, proj; k, v
    mlp = 2 * c * config.mlp_hidden
    return config.n_layer * (attn + mlp) + config.vocab_size * c


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward) at context ``seq_len`` (default block_size)."""
    t = config.block_size if seq_len is None else seq_len
    attention = 12 * config.n_layer * config.n_head * config.head_dim * t
    return 6 * matmul_params(config) + attention


def estimate_mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Fraction of ``peak_flops`` that training at ``tokens_per_s`` achieves."""
    if peak_flops <= 0:
        raise ChatforgeError(f"peak_flops must be > 0, got {peak_flops}")
    return flops_per_token * tokens_per_s / peak_flops


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known CUDA device, per GPU; None when unknown (e.g. CPU)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None
