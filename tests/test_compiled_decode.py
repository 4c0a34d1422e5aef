"""The compiled decode step (``generate(..., compile=True)``): the same tokens and log-probabilities as the
eager steps, for chatforge's own architecture and an imported GPT-2-style one, left-padded batches
included; int8 models fall back to the eager steps."""

from __future__ import annotations

import logging

import pytest
from helpers import random_gpt

from chatforge.model import GPT, generate, generate_details
from chatforge.model.compiled_decode import bucket_len, can_compile
from chatforge.model.quantize import quantize_model

V = 40
PROMPTS = [[3, 17, 5, 9, 1, 22, 8], [4], [30, 2, 11]]  # different lengths: left padding


def randomized(seed: int = 0, **kw) -> GPT:
    """Random weights everywhere (helpers.random_gpt) on this file's small default shape."""
    return random_gpt(seed, **{**dict(vocab_size=V, block_size=96, n_layer=2, n_embd=32, n_head=4), **kw})


@pytest.mark.parametrize("kw", [
    {"key_smear": True, "n_kv_head": 2, "logit_softcap": 15.0},  # chatforge's tiny preset is key_smear
    {"pos_embedding": "learned", "norm": "layer", "bias": "all", "mlp_act": "gelu_tanh", "qk_norm": False,
     "embed_norm": False, "tie_embeddings": True},  # GPT-2 as `chatforge import --hf` builds it
])
def test_compiled_steps_equal_eager_steps(kw):
    model = randomized(**kw)
    for sampling in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 20, "repetition_penalty": 1.2, "seed": 3}):
        eager = generate_details(model, PROMPTS, 30, dtype="fp32", **sampling)
        compiled = generate_details(model, PROMPTS, 30, dtype="fp32", compile=True, **sampling)
        for e, c in zip(eager, compiled):
            assert c.tokens == e.tokens
            assert c.finish_reason == e.finish_reason
            assert c.logprobs == pytest.approx(e.logprobs, abs=1e-4)


def test_bucket_len_rounds_up_to_a_power_of_two_within_the_context():
    assert bucket_len(1, 1024) == 64
    assert bucket_len(64, 1024) == 64
    assert bucket_len(65, 1024) == 128
    assert bucket_len(300, 512) == 512
    assert bucket_len(300, 400) == 400  # never past the context
    assert bucket_len(90, 96) == 96


def test_int8_model_decodes_eagerly_with_a_warning(caplog):
    model = randomized()
    q = quantize_model(model, "int8")
    assert can_compile(q) is not None and can_compile(model) is None
    with caplog.at_level(logging.WARNING, logger="chatforge.generate"):
        out = generate(q, PROMPTS, 8, temperature=0.0, dtype="fp32", compile=True)
    assert "compile=True ignored" in caplog.text
    assert out == generate(q, PROMPTS, 8, temperature=0.0, dtype="fp32")
