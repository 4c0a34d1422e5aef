"""The GPT: one decoder-only transformer, in the nanochat / modded-nanogpt style.

Choices, and why:
- RoPE instead of a learned position table: positions are relative, so a packed
  document or a left-padded prompt gets the same attention as when run alone, and
  the KV cache needs no position bookkeeping beyond a counter.
- RMSNorm without a learned gain, pre-norm, plus one norm right after the token
  embedding and one before the LM head (nanochat). modded-nanogpt and nanochat
  found the gain buys nothing at these scales; without it there is nothing to
  weight-decay or forget to exclude, and a Llama/Qwen export simply sets gains to 1.
- QK-norm (the same parameter-free RMSNorm on each head's queries and keys): it
  bounds the attention logits, the usual source of loss spikes at high learning
  rates. Because a rotation keeps the norm, normalising before or after RoPE is
  the same thing.
- ReLU^2 MLP (modded-nanogpt's record list; nanochat): better loss than GELU at the
  same parameter count, and two matrices instead of SwiGLU's three.
- No biases anywhere; optional tied embeddings; grouped-query attention
  (``n_kv_head`` divides ``n_head``) to shrink the KV cache.
- Init (nanochat): output projections of attention and MLP start at zero, so every
  block starts as the identity and the residual stream is not inflated with depth;
  an untied LM head starts at zero (uniform predictions, loss = ln V at step 0).
- Optional logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2, modded-nanogpt);
  off by default so logits stay plain and exportable.
- Optional smeared keys (Olsson et al. 2022, "In-context learning and induction heads"):
  each head's key is ``a * k_t + (1 - a) * k_{t-1}`` with a learned ``a = sigmoid(w)``
  per key head. A key then says which token came *before* position t, so one head can
  do what an induction head does (find where the current token occurred, read what
  followed) instead of two composing layers. Measured on the tiny shape with tied
  embeddings, on drills whose repeat distance varies: copying formed within ~150 steps
  with smeared keys and not at all in 150 without. The mix never reaches across a
  document or padding boundary; the KV cache keeps each layer's last raw key.

Variants for imported Hugging Face checkpoints (``chatforge import --hf``, see
``chatforge/interop/hf_arch.py``): GPT-2 and Llama/Qwen2 differ from the design above in
a few places, and a faithful import needs each of them, so ``GPTConfig`` has one
field per difference (``pos_embedding``, ``norm``, ``norm_eps``, ``embed_norm``,
``bias``, ``mlp_act``). Their defaults are the design above: a model that does not
set them builds, saves and runs exactly as before (the extra modules are then
parameter-free, so state dicts do not change).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model import flops as flops_mod
from chatforge.model.kv_cache import KVCache

# The string fields of GPTConfig and their values (the first is the default).
CHOICES: dict[str, tuple[str, ...]] = {
    "pos_embedding": ("rope", "learned"),
    "norm": ("rms", "rms_gain", "layer"),
    "bias": ("none", "qkv", "all"),
    "mlp_act": ("relu2", "gelu_tanh", "silu_gated"),
}
ASPECT_RATIO = 64  # from_depth: n_embd = depth * ASPECT_RATIO (nanochat's rule)
TARGET_HEAD_DIM = 64  # from_depth: heads are as many as fit with head_dim >= 64


@dataclass
class GPTConfig:
    """Shape of a GPT. Defaults are GPT-2 small (124M) with a 50304-token vocabulary."""

    vocab_size: int = 50304
    block_size: int = 1024  # maximum context length in tokens
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (plain multi-head)
    mlp_ratio: float = 4.0  # MLP hidden width = round(mlp_ratio * n_embd)
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qk_norm: bool = True
    dropout: float = 0.0
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    key_smear: bool = False  # smeared keys: each key mixes in the previous token's key (see the module docstring)
    # Imported-architecture variants (module docstring); the defaults are chatforge's own design.
    pos_embedding: str = "rope"  # "rope" | "learned" (GPT-2: a (block_size, n_embd) table added to the embedding)
    norm: str = "rms"  # "rms" (no gain) | "rms_gain" (Llama/Qwen2: learned gain) | "layer" (GPT-2: gain + bias)
    norm_eps: float = 0.0  # 0 = the dtype's machine epsilon (F.rms_norm's default); HF models state theirs
    embed_norm: bool = True  # a norm right after the token embedding (nanochat); GPT-2/Llama/Qwen2 have none
    bias: str = "none"  # "none" | "qkv" (Qwen2: q, k, v projections) | "all" (GPT-2: every linear but the LM head)
    mlp_act: str = "relu2"  # "relu2" | "gelu_tanh" (GPT-2) | "silu_gated" (SwiGLU, Llama/Qwen2: adds c_gate)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        self._check_types()
        checks = [
            (self.vocab_size >= 1, "vocab_size", "must be >= 1"),
            (self.block_size >= 1, "block_size", "must be >= 1"),
            (self.n_layer >= 1, "n_layer", "must be >= 1"),
            (self.n_head >= 1, "n_head", "must be >= 1"),
            (self.n_embd >= 1 and self.n_embd % self.n_head == 0, "n_embd",
             f"{self.n_embd} must be a positive multiple of n_head={self.n_head}"),
            # RoPE rotates pairs of dimensions; learned positions (GPT-2) need no even head_dim
            (self.n_head > 0 and (self.pos_embedding != "rope" or (self.n_embd // self.n_head) % 2 == 0), "n_head",
             f"head_dim = n_embd / n_head = {self.n_embd}/{self.n_head} must be even for RoPE"),
            (self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0, "n_kv_head",
             f"{self.n_kv_head} must be >= 1 and divide n_head={self.n_head}"),
            (self.mlp_ratio > 0, "mlp_ratio", "must be > 0"),
            (self.rope_theta > 0, "rope_theta", "must be > 0"),
            (0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)"),
            (self.logit_softcap >= 0, "logit_softcap", "must be >= 0 (0 = off)"),
            (self.norm_eps >= 0, "norm_eps", "must be >= 0 (0 = the dtype's machine epsilon)"),
        ]
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"GPTConfig.{key}: {getattr(self, key)!r} is not allowed; allowed: "
                                  f"{', '.join(allowed)}")
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"GPTConfig.{key}: {msg}")

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if hint in (int, int | None):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif hint is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                if ok:
                    setattr(self, f.name, float(value))
            elif hint is str:
                ok = isinstance(value, str)
            else:  # bool
                ok = isinstance(value, bool)
            if not ok:
                raise ConfigError(f"GPTConfig.{f.name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_ratio * self.n_embd)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, block_size: int, **overrides: Any) -> GPTConfig:
        """Derive a whole shape from one knob, as nanochat does; explicit overrides win.

        Rule: ``n_layer = depth``, ``n_embd = depth * 64`` and ``n_head`` = the largest
        count with ``head_dim >= 64`` (even) that divides ``n_embd``, which for
        ``n_embd = depth * 64`` is exactly ``depth`` heads of 64. So depth 12 is
        GPT-2 small's shape (768 wide, 12 heads) and depth 20 is nanochat's d20
        width with 64-dim heads. Overriding ``n_embd`` re-derives ``n_head`` from it
        unless ``n_head`` is overridden too.
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"GPTConfig.from_depth: depth must be an integer >= 1, got {depth!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                raise ConfigError(f"GPTConfig.from_depth: unknown override {key!r}; allowed: {', '.join(sorted(names))}")
        n_embd = overrides.pop("n_embd", depth * ASPECT_RATIO)
        n_head = overrides.pop("n_head", None)
        if n_head is None:
            n_head = default_n_head(n_embd)
        n_layer = overrides.pop("n_layer", depth)
        return cls(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd,
                   n_head=n_head, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "GPTConfig") -> GPTConfig:
        """Rebuild from ``to_dict`` output; ``source`` (e.g. a config.json path) prefixes errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of model config keys, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"{source}: unknown model config key {key!r}; allowed: {', '.join(names)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e


def default_n_head(n_embd: int) -> int:
    """Largest head count with an even head_dim >= 64 dividing ``n_embd`` (1 if none)."""
    if isinstance(n_embd, bool) or not isinstance(n_embd, int) or n_embd < 2:
        raise ConfigError(f"GPTConfig.n_embd: must be an integer >= 2, got {n_embd!r}")
    h = max(1, n_embd // TARGET_HEAD_DIM)
    while h > 1 and (n_embd % h or (n_embd // h) % 2):
        h -= 1
    return h


# --------------------------------------------------------------------------- building blocks


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


class Norm(nn.Module):
    """The norm ``GPTConfig.norm`` names. "rms" has no parameters, so chatforge's own models
    keep their state dicts; "rms_gain" is Llama/Qwen2's RMSNorm (x / rms(x) * gain) and
    "layer" GPT-2's LayerNorm (gain and bias)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.norm
        self.eps = config.norm_eps or None  # None: the input dtype's machine epsilon
        c = config.n_embd
        self.weight = nn.Parameter(torch.ones(c)) if self.kind != "rms" else None
        self.bias = nn.Parameter(torch.zeros(c)) if self.kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            eps = self.eps if self.eps is not None else float(torch.finfo(x.dtype).eps)
            return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_len, head_dim // 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D); cos/sin broadcast to (B, 1, T, D/2).

    The half-split pairing is the one Hugging Face Llama/Qwen use (``rotate_half``).
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        c = config.n_embd
        qkv_bias, out_bias = config.bias in ("qkv", "all"), config.bias == "all"  # Qwen2 / GPT-2 checkpoints
        self.c_q = nn.Linear(c, self.n_head * self.head_dim, bias=qkv_bias)
        self.c_k = nn.Linear(c, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.c_v = nn.Linear(c, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, c, bias=out_bias)
        # logit of a per key head; sigmoid(0) = half the own key, half the previous token's
        self.key_smear = nn.Parameter(torch.zeros(self.n_kv_head)) if config.key_smear else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None,
                is_causal: bool, kv_cache: KVCache | None, prev_ok: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.key_smear is not None:
            assert prev_ok is not None
            name = f"key{self.layer_idx}"
            first = kv_cache.previous(name) if kv_cache is not None else None
            prev = torch.cat([first.to(k.dtype) if first is not None else torch.zeros_like(k[:, :, :1]),
                              k[:, :, :-1]], dim=2)
            if kv_cache is not None:
                kv_cache.remember(name, k)  # the raw keys; the cache keeps what it needs
            a = torch.sigmoid(self.key_smear).to(k.dtype)[None, :, None, None]
            k = torch.where(prev_ok[:, None, :, None], a * k + (1 - a) * prev, k)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if cos is not None and sin is not None:  # None: learned positions, already added to the embedding
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache was made in another dtype
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """ReLU^2 (ours), GELU-tanh (GPT-2) or SwiGLU ``c_proj(silu(c_gate(x)) * c_fc(x))`` (Llama/Qwen2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.act = config.mlp_act
        bias = config.bias == "all"
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias)
        self.c_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias) if self.act == "silu_gated" else None
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_gate is not None:
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        if self.act == "gelu_tanh":
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm_attn, self.norm_mlp = Norm(config), Norm(config)  # parameter-free unless config.norm says
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None,
                is_causal: bool, kv_cache: KVCache | None, prev_ok: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm_attn(x), cos, sin, mask, is_causal, kv_cache, prev_ok)
        # Dropout only where it does something: a no-op module call per branch is ~10% of a small
        # model's decode step, and the serving engine's step holds the GIL that the HTTP loop needs.
        use_drop = self.training and self.drop.p > 0
        x = x + (self.drop(a) if use_drop else a)
        m = self.mlp(self.norm_mlp(x))
        return x + (self.drop(m) if use_drop else m)


# --------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """Decoder-only transformer language model; see the module docstring for its design."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # GPT-2's learned absolute positions; indexed with the same positions RoPE would get
        # (real tokens counted per row, restarting per document), so padding and the KV cache work alike.
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.norm_emb = Norm(config) if config.embed_norm else None
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm_f = Norm(config)
        # Tied: no separate module, the logits reuse wte.weight, so the state dict holds
        # the matrix once (safetensors refuses tensors that share storage).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.int8_head: nn.Module | None = None  # set by quantize_model: an int8 copy of the output matrix
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        if self.wpe is not None:  # no RoPE: empty tables keep the attribute without the memory
            cos, sin = cos[:0], sin[:0]
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from config: not in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @property
    def output_weight(self) -> torch.Tensor:
        """The (vocab, n_embd) matrix that produces logits (the embedding when tied)."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; uses the global torch RNG (seed it first)."""
        c = self.config.n_embd
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Spectral-style scaling (nanochat, arXiv:2310.17813): keeps each layer's
                # output at unit RMS for RMS-normalised input whatever the width.
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Norm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)  # GPT-2's init of the position table
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            if block.attn.key_smear is not None:
                nn.init.zeros_(block.attn.key_smear)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.lm_head is None:
            # Tied: the input side is RMS-normalised anyway, and with std 1/sqrt(C) the
            # initial logits have unit scale instead of sqrt(C).
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0 / math.sqrt(c))
        else:
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.lm_head.weight)

    # ------------------------------------------------------------------ counting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor once; ``exclude_embeddings`` drops the token
        embedding (which, when tied, is also the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + attention; see ``flops.py``."""
        return flops_mod.flops_per_token(self.config, seq_len)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation of a training run at ``tokens_per_s`` on hardware of ``peak_flops``."""
        return flops_mod.estimate_mfu(self.flops_per_token(seq_len), tokens_per_s, peak_flops)

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                            device_type: str = "cpu", eps: float = 1e-8) -> torch.optim.AdamW:
        """AdamW with decay on matmul weights only; see ``make_adamw``."""
        return make_adamw(self, weight_decay, lr, betas, device_type, eps)

    # ------------------------------------------------------------------ forward

    def forward_hidden(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, n_embd) after the final norm, for the LM head and task heads.

        Masks (all optional, combined with AND, always causal, and a position may
        always attend to itself):
        - ``padding_mask`` (B, T) bool/int, True = real token (Hugging Face's
          ``attention_mask``): pads are never attended to, and RoPE positions count
          real tokens only, so a left-padded row equals the row run alone.
        - ``doc_ids`` (B, T) int: packed documents; a token attends only within its
          document and positions restart at 0 where the id changes (as when the
          document runs alone; RoPE is relative, so this changes rounding only).
        - ``attn_mask`` bool (T, T), (B, T, T) or (B, 1, T, T), True = may attend.
        With ``kv_cache`` only ``padding_mask`` is supported (left-padded prompts).
        """
        if idx.ndim != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ChatforgeError(f"idx must be an integer tensor of shape (B, T), got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            what = f"{start} cached + {T} new tokens = {start + T}" if start else f"input of {T} tokens"
            raise ChatforgeError(
                f"{what} is longer than the model's context block_size={self.config.block_size}"
            )
        if kv_cache is not None:
            if attn_mask is not None or doc_ids is not None:
                raise ChatforgeError("kv_cache supports padding_mask only, not attn_mask or doc_ids")
            positions, mask, is_causal = kv_cache.prepare(T, padding_mask)
        else:
            positions, mask, is_causal = self._layout(B, T, idx.device, attn_mask, doc_ids, padding_mask)
        x = self.wte(idx)
        cos: torch.Tensor | None = None
        sin: torch.Tensor | None = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device) if positions is None else positions)
        elif positions is None:
            cos, sin = self.rope_cos[start:start + T][None, None], self.rope_sin[start:start + T][None, None]
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        if self.norm_emb is not None:
            x = self.norm_emb(x)
        prev_ok = self._prev_ok(B, T, idx.device, kv_cache, doc_ids, padding_mask) if self.config.key_smear else None
        for block in self.blocks:
            x = block(x, cos, sin, mask, is_causal, kv_cache, prev_ok)
        if kv_cache is not None:
            kv_cache.commit()
        return self.norm_f(x)

    @staticmethod
    def _prev_ok(B: int, T: int, device: torch.device, kv_cache: Any, doc_ids: torch.Tensor | None,
                 padding_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) bool: whether each token's predecessor is a real token of its own document (what a
        smeared key may mix in); the first new token's predecessor is the cache's last token, if any."""
        ok = torch.ones(B, T, dtype=torch.bool, device=device)
        first = kv_cache.previous_ok() if kv_cache is not None else None
        ok[:, 0] = False if first is None else first.to(device)
        if padding_mask is not None:
            ok[:, 1:] &= padding_mask.to(device=device, dtype=torch.bool)[:, :-1]
        if doc_ids is not None:
            d = doc_ids.to(device)
            ok[:, 1:] &= d[:, 1:] == d[:, :-1]
        return ok

    def _layout(self, B: int, T: int, device: torch.device, attn_mask: torch.Tensor | None,
                doc_ids: torch.Tensor | None, padding_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """(RoPE positions or None, boolean mask (B|1, 1, T, T) or None, is_causal)."""
        positions: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        if padding_mask is not None:
            if padding_mask.shape != (B, T):
                raise ChatforgeError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected ({B}, {T})")
            pm = padding_mask.to(device=device, dtype=torch.bool)
            if not bool(pm.all()):
                positions = (pm.long().cumsum(1) - 1).clamp(min=0)
                mask = pm[:, None, None, :]
        if doc_ids is not None:
            if doc_ids.shape != (B, T):
                raise ChatforgeError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected ({B}, {T})")
            doc_ids = doc_ids.to(device)
            # Position within the document: t minus the index where its document began.
            t = torch.arange(T, device=device).expand(B, T)
            starts = torch.ones(B, T, dtype=torch.bool, device=device)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            positions = t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
            same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
            mask = same_doc if mask is None else mask & same_doc
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool or attn_mask.shape[-2:] != (T, T) or attn_mask.ndim not in (2, 3, 4) \
                    or (attn_mask.ndim == 4 and attn_mask.shape[1] != 1) \
                    or (attn_mask.ndim >= 3 and attn_mask.shape[0] not in (1, B)):
                raise ChatforgeError(
                    f"attn_mask must be bool of shape (T, T), (B, T, T) or (B, 1, T, T) with B={B}, T={T}; "
                    f"got {tuple(attn_mask.shape)} {attn_mask.dtype}"
                )
            am = attn_mask.to(device)
            am = am.view(-1, 1, T, T)
            mask = am if mask is None else mask & am
        if mask is None:
            return positions, None, True  # the fast path: flash attention on GPU
        idx = torch.arange(T, device=device)
        causal = idx[None, :] <= idx[:, None]
        mask = (mask & causal) | torch.eye(T, dtype=torch.bool, device=device)
        return positions, mask, False

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (..., vocab) from final hidden states."""
        if self.int8_head is not None:
            logits = self.int8_head(hidden.float())
        else:
            logits = F.linear(hidden, self.output_weight).float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        loss_reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns ``(logits, loss)``, or ``(logits, loss, hidden)`` with ``return_hidden``.

        ``logits`` are fp32 (B, T, vocab). ``loss`` is None without ``targets``; else
        cross-entropy over positions where ``targets != -1`` and ``loss_mask`` (if
        given) is true, reduced by ``loss_reduction``: "mean" (0 when no position
        counts, never NaN), "sum", or "none" for a (B, T) tensor that is 0 where
        ignored (per-token log-likelihoods for DPO/PPO and bits-per-byte).
        """
        hidden = self.forward_hidden(idx, kv_cache=kv_cache, attn_mask=attn_mask, doc_ids=doc_ids,
                                     padding_mask=padding_mask)
        logits = self.logits_from_hidden(hidden)
        loss = None
        if targets is not None:
            loss = token_loss(logits, targets, loss_mask, loss_reduction)
        return (logits, loss, hidden) if return_hidden else (logits, loss)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) targets; -1 targets are ignored."""
    if reduction not in ("mean", "sum", "none"):
        raise ChatforgeError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets.shape != logits.shape[:-1]:
        raise ChatforgeError(f"targets have shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])}")
    keep = targets != -1
    if loss_mask is not None:
        if loss_mask.shape != targets.shape:
            raise ChatforgeError(f"loss_mask has shape {tuple(loss_mask.shape)}, expected {tuple(targets.shape)}")
        keep = keep & loss_mask.to(device=keep.device, dtype=torch.bool)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                         ignore_index=-1, reduction="none").view(targets.shape)
    ce = ce * keep  # also zeroes positions that loss_mask drops
    if reduction == "none":
        return ce
    if reduction == "sum":
        return ce.sum()
    return ce.sum() / keep.sum().clamp(min=1)


# --------------------------------------------------------------------------- optimizer


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: "decay" = matmul weights (>= 2-D, not an embedding table);
    "no_decay" = embeddings, norms' gains, biases. Frozen parameters are left out.

    Decaying an embedding pulls rare tokens' vectors to zero just for being rare,
    and decaying gains/biases fights their role as scales and offsets.
    """
    embedding_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in module.parameters():  # shared (tied) tensors are listed once
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def make_adamw(module: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
               device_type: str = "cpu", eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused CUDA kernel when every parameter is on CUDA."""
    groups = param_groups(module, weight_decay)
    if not groups:
        raise ChatforgeError("no trainable parameters: every parameter has requires_grad=False")
    fused = (
        device_type == "cuda"
        and "fused" in inspect.signature(torch.optim.AdamW).parameters
        and all(p.is_cuda for g in groups for p in g["params"])
    )
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **extra)
