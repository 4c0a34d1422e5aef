"""The GPT model, its task heads, KV-cache generation and FLOP accounting."""

from chatforge.model.flops import estimate_mfu, flops_per_token, peak_flops
from chatforge.model.generate import (
    Generation,
    adjust_logits,
    generate,
    generate_details,
    sample_next_token,
    stream,
)
from chatforge.model.gpt import GPT, GPTConfig, make_adamw, param_groups, token_loss
from chatforge.model.heads import ClassifierHead, GPTWithHead, ScalarHead
from chatforge.model.kv_cache import KVCache

__all__ = [
    "GPT",
    "ClassifierHead",
    "GPTConfig",
    "GPTWithHead",
    "Generation",
    "KVCache",
    "ScalarHead",
    "adjust_logits",
    "estimate_mfu",
    "flops_per_token",
    "generate",
    "generate_details",
    "make_adamw",
    "param_groups",
    "peak_flops",
    "sample_next_token",
    "stream",
    "token_loss",
]
