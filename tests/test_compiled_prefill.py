"""The compiled prefill (``Engine(compile=True)``, ``chatforge serve --compile``): a right-padded, bucketed
prompt forward that writes the same cache rows and gives the same first logits as the eager prefill, so the
engine streams the same tokens; int8 models are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import random_gpt

from chatforge.errors import ChatforgeError
from chatforge.model.compiled_prefill import compiled_prefill, prefill_bucket, prefill_buckets, warm_up
from chatforge.model.generate import forward_autocast, lm_logits
from chatforge.model.quantize import model_precision, quantize_model
from chatforge.serve.engine import Engine, SamplingParams, SlotKVCache
from chatforge.tokenizer.byte import ByteTokenizer

TOK = ByteTokenizer()
LENGTHS = (1, 7, 63, 64, 65, 90)  # both buckets of a 96-token context, and their edges


def smeared_model():
    """chatforge's tiny-preset architecture (smeared keys) with grouped-query attention, random weights."""
    return random_gpt(0, vocab_size=TOK.vocab_size, block_size=96, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      key_smear=True, qk_norm=True)


@pytest.fixture(scope="module")
def model():
    m = smeared_model()
    with torch.no_grad(), forward_autocast(model_precision(m, "fp32", torch.device("cpu"))):
        warm_up(m)  # both buckets, once for the module
    return m


def test_buckets_are_multiples_of_64_then_of_a_quarter_power_of_two_within_the_context():
    assert [prefill_bucket(n, 1024) for n in (1, 64, 65, 185, 256, 257, 384, 385, 600, 1000)] == \
        [64, 64, 128, 192, 256, 384, 384, 512, 768, 1024]
    assert prefill_bucket(90, 96) == 96  # never past the context
    assert prefill_buckets(512) == [64, 128, 192, 256, 384, 512]
    assert prefill_buckets(96) == [64, 96]
    for n in range(1, 1025):
        b = prefill_bucket(n, 1024)
        assert n <= b <= 1024 and b in prefill_buckets(1024)


def test_compiled_prefill_writes_the_eager_cache_row(model):
    torch.manual_seed(1)
    with torch.no_grad(), forward_autocast(model_precision(model, "fp32", torch.device("cpu"))):
        for T in LENGTHS:
            prompt = torch.randint(0, TOK.vocab_size, (T,)).tolist()
            eager = SlotKVCache.for_model(model, 2)
            eager.begin_prefill(1)
            hidden = model.forward_hidden(torch.tensor([prompt]), kv_cache=eager)[:, -1]
            eager.lengths[1] = T
            out = compiled_prefill(model, prompt)
            compiled = SlotKVCache.for_model(model, 2)
            compiled.write_prompt(1, out.k, out.v, out.last)
            assert compiled.lengths == eager.lengths
            torch.testing.assert_close(lm_logits(model, out.hidden), lm_logits(model, hidden), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(compiled.k[:, 1, :, :T], eager.k[:, 1, :, :T], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compiled.v[:, 1, :, :T], eager.v[:, 1, :, :T], atol=1e-5, rtol=1e-5)
            assert compiled.last.keys() == eager.last.keys() and compiled.last
            for name in eager.last:
                torch.testing.assert_close(compiled.last[name][1], eager.last[name][1], atol=1e-5, rtol=1e-5)


def test_engine_with_compiled_prefill_streams_the_eager_tokens(model):
    torch.manual_seed(2)
    prompts = [torch.randint(0, TOK.vocab_size, (T,)).tolist() for T in LENGTHS]

    def replies(compile: bool) -> list[tuple[list[int], list[float]]]:
        with Engine(model, TOK, max_batch=3, dtype="fp32", compile=compile) as eng:
            handles = [eng.submit(p, SamplingParams(max_tokens=5, temperature=0, logprobs=0)) for p in prompts]
            events = [list(h) for h in handles]
        return [([e.token_id for e in ev], [e.logprob for e in ev]) for ev in events]

    for (et, elp), (ct, clp) in zip(replies(False), replies(True)):
        assert ct == et
        assert clp == pytest.approx(elp, abs=1e-4)


def test_int8_models_cannot_compile_the_prefill():
    q = quantize_model(smeared_model(), "int8")
    with pytest.raises(ChatforgeError, match="cannot compile the prefill: int8"):
        Engine(q, TOK, dtype="fp32", compile=True)
