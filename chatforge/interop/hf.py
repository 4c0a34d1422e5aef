"""Convert a chatforge ``GPT`` into an equivalent Hugging Face ``transformers`` model.

"Equivalent" means same logits (to float rounding), so ``generate()``, the HF
evaluation tools and the Hub's loaders see exactly our model. Two targets:

- ``qk_norm=True`` (the default) -> ``NanoChatForCausalLM``: it has every piece of
  ours (parameter-free RMSNorm, a norm right after the embedding, per-head QK-norm,
  ReLU^2 MLP with two matrices, no biases, optional logit soft-cap). Two details
  differ and are absorbed by the weights:
  * its ``rotate_half`` is ``cat(x2, -x1)``, a rotation by -theta where we (and
    Llama) rotate by +theta. Negating the second half of every head's q and k
    (P = diag(1, -1)) turns one into the other, since P R(theta) P = R(-theta), and
    P is orthogonal so q.k and the RMS norm are unchanged. So q_proj / k_proj are our
    c_q / c_k with those rows negated.
  * it normalises q/k after RoPE, we before; a rotation keeps the norm, so same.
- ``qk_norm=False`` -> ``ArceeForCausalLM`` (Llama with a non-gated ReLU^2 MLP).
  Llama has no norm after the embedding and its norms have gains, so the gains are
  set to 1 and the embedding table is stored already RMS-normalised (each row is
  what our ``rms_norm(wte(idx))`` computes, bit for bit). That table is then no
  longer the LM head, so the export is always untied. Llama has no logit soft-cap:
  a soft-capped model without QK-norm has no exact equivalent and is refused.

``rms_norm_eps`` is fp32's machine epsilon: our ``F.rms_norm(x, eps=None)`` uses
``torch.finfo(x.dtype).eps``, which is that for fp32 weights.

Models imported from GPT-2 / Llama / Qwen2 (``GPTConfig`` variants, see
``hf_arch.py``) export back to their own class: ``GPT2LMHeadModel``,
``LlamaForCausalLM``, ``Qwen2ForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.interop import hf_arch
from chatforge.model.gpt import GPT, GPTConfig, rms_norm

_RMS_EPS = float(torch.finfo(torch.float32).eps)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # optional dependency: only the export and the benchmarks need it
        raise ChatforgeError("Hugging Face export needs the `transformers` package: pip install transformers") from e
    return transformers


def hf_config(config: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> Any:
    """The ``transformers`` config (``NanoChatConfig`` or ``ArceeConfig``) of a model of this shape.

    Token ids default to None: HF's own defaults (e.g. eos=1) are another tokenizer's
    and would make ``generate()`` stop on an ordinary token.
    """
    if config.key_smear:
        raise ConfigError(
            "GPTConfig.key_smear: each key mixes in the previous token's key (smeared keys), which no Hugging "
            "Face Llama/NanoChat model class has; train with model.key_smear=false to export"
        )
    tf = _transformers()
    fam = hf_arch.family(config)
    if fam != "native":
        return hf_arch.hf_config_of(config, fam, dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                                      pad_token_id=pad_token_id))
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size,
        hidden_act="relu2",
        rms_norm_eps=_RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attn_implementation="sdpa",
    )
    if config.qk_norm:
        return tf.NanoChatConfig(
            **common,
            tie_word_embeddings=config.tie_embeddings,
            final_logit_softcapping=config.logit_softcap if config.logit_softcap > 0 else None,
        )
    if config.logit_softcap > 0:
        raise ConfigError(
            "GPTConfig.logit_softcap: a model without qk_norm exports to Llama-style ArceeForCausalLM, which has "
            "no logit soft-cap; no exact Hugging Face equivalent exists (set logit_softcap=0 or qk_norm=true)"
        )
    return tf.ArceeConfig(**common, head_dim=config.head_dim, mlp_bias=False, tie_word_embeddings=False)


def _flip_rope_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Negate the second half of each head's output rows of a q/k projection (see module docstring)."""
    w = w.detach().clone().view(n_heads, head_dim, -1)
    w[:, head_dim // 2:] *= -1
    return w.view(n_heads * head_dim, -1)


@torch.no_grad()
def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under the ``transformers`` names of ``hf_config(model.config)``'s model."""
    cfg = model.config
    fam = hf_arch.family(cfg)
    if fam != "native":
        return hf_arch.state_dict_to_hf(fam, cfg, model.state_dict())
    sd: dict[str, torch.Tensor] = {}
    if cfg.qk_norm:
        sd["model.embed_tokens.weight"] = model.wte.weight.detach().clone()
    else:
        sd["model.embed_tokens.weight"] = rms_norm(model.wte.weight.detach().float()).to(model.wte.weight.dtype)
    sd["lm_head.weight"] = model.output_weight.detach().clone()
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        if cfg.qk_norm:
            sd[p + "self_attn.q_proj.weight"] = _flip_rope_half(attn.c_q.weight, cfg.n_head, cfg.head_dim)
            sd[p + "self_attn.k_proj.weight"] = _flip_rope_half(attn.c_k.weight, cfg.n_kv_head, cfg.head_dim)
            sd[p + "mlp.fc1.weight"] = mlp.c_fc.weight.detach().clone()
            sd[p + "mlp.fc2.weight"] = mlp.c_proj.weight.detach().clone()
        else:
            sd[p + "self_attn.q_proj.weight"] = attn.c_q.weight.detach().clone()
            sd[p + "self_attn.k_proj.weight"] = attn.c_k.weight.detach().clone()
            sd[p + "mlp.up_proj.weight"] = mlp.c_fc.weight.detach().clone()
            sd[p + "mlp.down_proj.weight"] = mlp.c_proj.weight.detach().clone()
            ones = torch.ones(cfg.n_embd, dtype=model.wte.weight.dtype, device=model.wte.weight.device)
            sd[p + "input_layernorm.weight"] = ones.clone()
            sd[p + "post_attention_layernorm.weight"] = ones.clone()
        sd[p + "self_attn.v_proj.weight"] = attn.c_v.weight.detach().clone()
        sd[p + "self_attn.o_proj.weight"] = attn.c_proj.weight.detach().clone()
    if not cfg.qk_norm:
        sd["model.norm.weight"] = torch.ones(cfg.n_embd, dtype=model.wte.weight.dtype, device=model.wte.weight.device)
    return sd


@torch.no_grad()
def to_hf(model: GPT, bos_token_id: int | None = None, eos_token_id: int | None = None,
          pad_token_id: int | None = None) -> Any:
    """A ``transformers`` causal LM (eval mode, same device and dtype) with ``model``'s logits.

    ``save_pretrained`` on the result writes a folder that
    ``AutoModelForCausalLM.from_pretrained`` loads.
    """
    if not isinstance(model, GPT):
        raise ChatforgeError(f"to_hf: expected a chatforge GPT, got {type(model).__name__}")
    tf = _transformers()
    config = hf_config(model.config, bos_token_id, eos_token_id, pad_token_id)
    fam = hf_arch.family(model.config)
    if fam != "native":
        cls = getattr(tf, hf_arch.HF_CLASS[fam])
    else:
        cls = tf.NanoChatForCausalLM if model.config.qk_norm else tf.ArceeForCausalLM
    weight = model.wte.weight
    hf = cls(config).to(device=weight.device, dtype=weight.dtype)
    sd = hf_state_dict(model)
    expected = set(hf.state_dict())
    if set(sd) != expected:  # a transformers release renamed something: fail loudly, not half-loaded
        raise ChatforgeError(
            f"to_hf: weight names do not match {cls.__name__} of transformers {tf.__version__}: "
            f"missing {sorted(expected - set(sd))[:5]}, unexpected {sorted(set(sd) - expected)[:5]}"
        )
    hf.load_state_dict(sd, strict=True)
    # generate() must not stop or pad on HF's default ids, which belong to another tokenizer.
    hf.generation_config.bos_token_id = bos_token_id
    hf.generation_config.eos_token_id = eos_token_id
    hf.generation_config.pad_token_id = pad_token_id
    return hf.eval()
