"""Export to Hugging Face transformers: the converted model gives the same logits and the same greedy text."""

from __future__ import annotations

import pytest
import torch
from helpers import random_gpt

from chatforge.errors import ConfigError
from chatforge.interop import hf_config, to_hf
from chatforge.model import GPT, GPTConfig, generate

transformers = pytest.importorskip("transformers", reason="transformers not installed (optional: the bench extra)")

V = 97


def randomized(seed: int = 0, **kw) -> GPT:
    """Random weights everywhere (helpers.random_gpt) on this file's small default shape."""
    return random_gpt(seed, **{**dict(vocab_size=V, block_size=64, n_layer=2, n_embd=64, n_head=4), **kw})


SHAPES = {
    "nanochat": dict(),
    "nanochat-gqa-tied-softcap": dict(n_kv_head=2, tie_embeddings=True, logit_softcap=15.0, rope_theta=500.0),
    "arcee": dict(qk_norm=False),
    "arcee-mqa-tied": dict(qk_norm=False, n_kv_head=1, tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_fp32(name: str) -> None:
    model = randomized(**SHAPES[name])
    hf = to_hf(model)
    expected = "NanoChatForCausalLM" if model.config.qk_norm else "ArceeForCausalLM"
    assert type(hf).__name__ == expected
    idx = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    ours, _ = model(idx)
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_greedy_generate_matches_with_left_padding(qk_norm: bool) -> None:
    model = randomized(qk_norm=qk_norm)
    hf = to_hf(model, pad_token_id=0)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40]]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    ours = generate(model, prompts, 12, temperature=0.0, dtype="fp32")  # the HF peer runs in fp32
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert theirs[:, T:].tolist() == ours


def test_save_pretrained_loads_with_auto_class(tmp_path) -> None:
    model = randomized(tie_embeddings=True)
    to_hf(model).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, model(idx)[0], atol=1e-4, rtol=0)


def test_no_default_stop_tokens() -> None:
    # HF's NanoChat defaults (eos=1, pad=1) belong to another tokenizer: generation must not stop on them.
    hf = to_hf(randomized())
    assert hf.config.eos_token_id is None and hf.generation_config.eos_token_id is None


def test_softcap_without_qk_norm_is_refused() -> None:
    with pytest.raises(ConfigError, match="logit_softcap"):
        hf_config(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_embd=32, n_head=2, qk_norm=False,
                            logit_softcap=30.0))


def test_smeared_keys_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="key_smear"):
        hf_config(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_embd=32, n_head=2, qk_norm=False,
                            key_smear=True))
