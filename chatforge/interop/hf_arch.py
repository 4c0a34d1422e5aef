"""GPT-2 and Llama/Qwen2 checkpoints <-> chatforge ``GPT`` weights, both ways.

A *family* is a set of ``GPTConfig`` values that one Hugging Face model class
computes exactly:

- ``gpt2`` (``GPT2LMHeadModel``): learned positions, LayerNorm with gain and bias,
  GELU (tanh approximation, GPT-2's ``gelu_new``), biases on every linear layer,
  tied embeddings, no norm after the embedding. GPT-2's ``Conv1D`` layers store
  their weights as (in, out), the transpose of ``nn.Linear``, and its fused
  ``c_attn`` holds q, k and v one after the other.
- ``llama`` (``LlamaForCausalLM``) and ``qwen2`` (``Qwen2ForCausalLM``): RoPE with
  the ``rotate_half`` pairing (ours), RMSNorm with a gain, SwiGLU
  (``down(silu(gate(x)) * up(x))``), grouped-query attention, tied or untied
  embeddings; Qwen2 adds biases to q, k and v.

chatforge's own design (parameter-free norms, a norm after the embedding, ReLU^2,
QK-norm) exports through ``hf.py`` to NanoChat/Arcee instead; ``family`` tells which
path a config takes.
"""

from __future__ import annotations

from typing import Any

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPTConfig

FAMILIES = ("gpt2", "llama", "qwen2")
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_CLASS = {family: cls for cls, family in ARCHITECTURES.items()}


def _refuse(what: str, why: str) -> ChatforgeError:
    return ChatforgeError(f"cannot import this Hugging Face model: {what}: {why}")


def family(cfg: GPTConfig) -> str:
    """``native`` (chatforge's design: NanoChat/Arcee export) or one of ``FAMILIES``; an error naming
    the fields of a mix that no single Hugging Face class computes."""
    native = dict(pos_embedding="rope", norm="rms", embed_norm=True, bias="none", mlp_act="relu2")
    llama = dict(pos_embedding="rope", norm="rms_gain", embed_norm=False, mlp_act="silu_gated", qk_norm=False,
                 logit_softcap=0.0, key_smear=False)
    gpt2 = dict(pos_embedding="learned", norm="layer", embed_norm=False, bias="all", mlp_act="gelu_tanh",
                qk_norm=False, logit_softcap=0.0, key_smear=False, tie_embeddings=True)
    if all(getattr(cfg, k) == v for k, v in native.items()):
        return "native"
    if all(getattr(cfg, k) == v for k, v in llama.items()) and cfg.bias in ("none", "qkv"):
        return "llama" if cfg.bias == "none" else "qwen2"
    if all(getattr(cfg, k) == v for k, v in gpt2.items()) and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    fields = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in (*native, "qk_norm", "tie_embeddings"))
    raise ChatforgeError(
        f"no Hugging Face model class computes this GPTConfig ({fields}); exportable are chatforge's own "
        "design (NanoChat/Arcee) and the GPT-2, Llama and Qwen2 layouts `chatforge import --hf` creates"
    )


# --------------------------------------------------------------------------- HF -> chatforge


def _rope_theta(hf: Any) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    scaling = getattr(hf, "rope_scaling", None)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "default":
        raise _refuse(f"rope type {rope_type!r}", "only plain RoPE is implemented (no llama3/yarn/linear scaling)")
    return float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def gpt_config_from_hf(hf: Any, block_size: int | None = None) -> tuple[GPTConfig, str]:
    """The ``GPTConfig`` (and family) of a ``transformers`` config; errors name what has no equivalent."""
    arch = (getattr(hf, "architectures", None) or [""])[0]
    fam = ARCHITECTURES.get(arch) or {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2"}.get(hf.model_type)
    if fam is None:
        raise _refuse(f"architecture {arch or hf.model_type!r}",
                      f"supported are {', '.join(ARCHITECTURES)}")
    if fam == "gpt2":
        act = hf.activation_function
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _refuse(f"activation_function {act!r}", "only GPT-2's tanh-approximated GELU is implemented")
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
            raise _refuse("attention scaling", "only 1/sqrt(head_dim) is implemented")
        if getattr(hf, "add_cross_attention", False):
            raise _refuse("add_cross_attention", "a decoder-only model cannot hold cross-attention")
        inner = hf.n_inner or 4 * hf.n_embd
        n_ctx = hf.n_positions
        kw = dict(vocab_size=hf.vocab_size, n_layer=hf.n_layer, n_embd=hf.n_embd, n_head=hf.n_head,
                  mlp_ratio=inner / hf.n_embd, tie_embeddings=True, qk_norm=False, pos_embedding="learned",
                  norm="layer", norm_eps=float(hf.layer_norm_epsilon), embed_norm=False, bias="all",
                  mlp_act="gelu_tanh")
    else:
        if hf.hidden_act != "silu":
            raise _refuse(f"hidden_act {hf.hidden_act!r}", "only SwiGLU (silu) is implemented")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        if head_dim * hf.num_attention_heads != hf.hidden_size:
            raise _refuse(f"head_dim {head_dim}", f"chatforge needs head_dim = hidden_size / num_attention_heads "
                                                  f"= {hf.hidden_size // hf.num_attention_heads}")
        if fam == "llama" and (getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False)):
            raise _refuse("attention_bias/mlp_bias", "Llama biases are not implemented (Qwen2's q/k/v biases are)")
        layer_types = getattr(hf, "layer_types", None) or []
        if getattr(hf, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise _refuse("sliding-window attention", "only full causal attention is implemented")
        n_ctx = hf.max_position_embeddings
        kw = dict(vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_embd=hf.hidden_size,
                  n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads or hf.num_attention_heads,
                  mlp_ratio=hf.intermediate_size / hf.hidden_size, rope_theta=_rope_theta(hf),
                  tie_embeddings=bool(hf.tie_word_embeddings), qk_norm=False, norm="rms_gain",
                  norm_eps=float(hf.rms_norm_eps), embed_norm=False, bias="qkv" if fam == "qwen2" else "none",
                  mlp_act="silu_gated")
    if block_size is not None:
        if not 1 <= block_size <= n_ctx:
            raise ChatforgeError(f"--block-size {block_size}: must be between 1 and the model's context {n_ctx}")
        n_ctx = block_size
    cfg = GPTConfig(block_size=n_ctx, **kw)
    intermediate = round(kw["mlp_ratio"] * kw["n_embd"])
    if cfg.mlp_hidden != intermediate:  # cannot happen for integer widths below 2^52; checked, not assumed
        raise _refuse("intermediate size", f"mlp_ratio does not reproduce {intermediate}")
    return cfg, fam


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.detach().t().contiguous()


def state_dict_from_hf(fam: str, cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """chatforge weights (``GPT(cfg).state_dict()`` names) from a ``transformers`` state dict."""
    out: dict[str, torch.Tensor] = {}
    take = _taker(sd)
    if fam == "gpt2":
        C = cfg.n_embd
        out["wte.weight"] = take("transformer.wte.weight")
        out["wpe.weight"] = take("transformer.wpe.weight")[:cfg.block_size]
        for i in range(cfg.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
                out[q + ours + ".weight"] = take(p + theirs + ".weight")
                out[q + ours + ".bias"] = take(p + theirs + ".bias")
            w, b = _t(take(p + "attn.c_attn.weight")), take(p + "attn.c_attn.bias")  # Conv1D: (in, out)
            for k, name in enumerate(("c_q", "c_k", "c_v")):
                out[q + f"attn.{name}.weight"] = w[k * C:(k + 1) * C].contiguous()
                out[q + f"attn.{name}.bias"] = b[k * C:(k + 1) * C].contiguous()
            for ours, theirs in (("attn.c_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
                out[q + ours + ".weight"] = _t(take(p + theirs + ".weight"))
                out[q + ours + ".bias"] = take(p + theirs + ".bias")
        out["norm_f.weight"] = take("transformer.ln_f.weight")
        out["norm_f.bias"] = take("transformer.ln_f.bias")
        take.drop("lm_head.weight")  # tied to wte
    else:
        out["wte.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            out[q + "norm_attn.weight"] = take(p + "input_layernorm.weight")
            out[q + "norm_mlp.weight"] = take(p + "post_attention_layernorm.weight")
            for ours, theirs in (("c_q", "q_proj"), ("c_k", "k_proj"), ("c_v", "v_proj"), ("c_proj", "o_proj")):
                out[q + f"attn.{ours}.weight"] = take(p + f"self_attn.{theirs}.weight")
                if fam == "qwen2" and ours != "c_proj":
                    out[q + f"attn.{ours}.bias"] = take(p + f"self_attn.{theirs}.bias")
            for ours, theirs in (("c_fc", "up_proj"), ("c_gate", "gate_proj"), ("c_proj", "down_proj")):
                out[q + f"mlp.{ours}.weight"] = take(p + f"mlp.{theirs}.weight")
        out["norm_f.weight"] = take("model.norm.weight")
        if cfg.tie_embeddings:
            take.drop("lm_head.weight")
        else:
            out["lm_head.weight"] = take("lm_head.weight")
    take.check_all_used()
    return out


class _taker:
    """Hands out tensors by name and finally insists that none was left unread (a weight the
    mapping does not know would otherwise be dropped silently)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd, self.used = sd, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.sd:
            raise _refuse(f"weight {name!r} is missing", "the checkpoint does not have the layout its config names")
        self.used.add(name)
        return self.sd[name].detach().clone()

    def drop(self, name: str) -> None:
        self.used.add(name)

    def check_all_used(self) -> None:
        left = sorted(k for k in self.sd if k not in self.used and not k.endswith((".attn.bias", ".attn.masked_bias")))
        if left:
            raise _refuse(f"weights {left[:5]}", "have no place in a chatforge GPT")


# --------------------------------------------------------------------------- chatforge -> HF


def hf_config_of(cfg: GPTConfig, fam: str, token_ids: dict[str, int | None]) -> Any:
    """The ``transformers`` config of a ``gpt2``/``llama``/``qwen2`` family model."""
    import transformers as tf

    if fam == "gpt2":
        return tf.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                             n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                             activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps or 1e-5,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                             **token_ids)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  max_position_embeddings=cfg.block_size, hidden_act="silu",
                  rms_norm_eps=cfg.norm_eps or float(torch.finfo(torch.float32).eps),
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0, **token_ids)
    if fam == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    return tf.LlamaConfig(**common, head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False)


def state_dict_to_hf(fam: str, cfg: GPTConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``state_dict_from_hf``."""
    sd: dict[str, torch.Tensor] = {}
    g = {k: v.detach().clone() for k, v in ours.items()}
    if fam == "gpt2":
        sd["transformer.wte.weight"] = g["wte.weight"]
        sd["transformer.wpe.weight"] = g["wpe.weight"]
        for i in range(cfg.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for ours_name, theirs in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
                sd[p + theirs + ".weight"] = g[q + ours_name + ".weight"]
                sd[p + theirs + ".bias"] = g[q + ours_name + ".bias"]
            sd[p + "attn.c_attn.weight"] = _t(torch.cat([g[q + f"attn.{n}.weight"] for n in ("c_q", "c_k", "c_v")]))
            sd[p + "attn.c_attn.bias"] = torch.cat([g[q + f"attn.{n}.bias"] for n in ("c_q", "c_k", "c_v")])
            for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                sd[p + name + ".weight"] = _t(g[q + name + ".weight"])
                sd[p + name + ".bias"] = g[q + name + ".bias"]
        sd["transformer.ln_f.weight"] = g["norm_f.weight"]
        sd["transformer.ln_f.bias"] = g["norm_f.bias"]
        sd["lm_head.weight"] = g["wte.weight"]
        return sd
    sd["model.embed_tokens.weight"] = g["wte.weight"]
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        sd[p + "input_layernorm.weight"] = g[q + "norm_attn.weight"]
        sd[p + "post_attention_layernorm.weight"] = g[q + "norm_mlp.weight"]
        for ours_name, theirs in (("c_q", "q_proj"), ("c_k", "k_proj"), ("c_v", "v_proj"), ("c_proj", "o_proj")):
            sd[p + f"self_attn.{theirs}.weight"] = g[q + f"attn.{ours_name}.weight"]
            if fam == "qwen2" and ours_name != "c_proj":
                sd[p + f"self_attn.{theirs}.bias"] = g[q + f"attn.{ours_name}.bias"]
        for ours_name, theirs in (("c_fc", "up_proj"), ("c_gate", "gate_proj"), ("c_proj", "down_proj")):
            sd[p + f"mlp.{theirs}.weight"] = g[q + f"mlp.{ours_name}.weight"]
    sd["model.norm.weight"] = g["norm_f.weight"]
    sd["lm_head.weight"] = g["wte.weight"] if cfg.tie_embeddings else g["lm_head.weight"]
    return sd
