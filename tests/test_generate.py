"""KV-cache decoding and sampling: cache == full recomputation, batching, sampling rules, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.model import GPT, GPTConfig, KVCache, adjust_logits, generate, sample_next_token, stream

V = 40


def randomized(seed: int = 0, **kw) -> GPT:
    """Random weights everywhere (the real init zeroes the LM head: all logits equal)."""
    cfg = dict(vocab_size=V, block_size=48, n_layer=2, n_embd=32, n_head=4)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference decoder: re-run the whole sequence for every token, no cache."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[3, 17, 5, 9, 1, 22, 8], [4], [30, 2, 11]]


# --------------------------------------------------------------------------- cache == recompute


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": True}])
def test_cached_logits_equal_full_recomputation_batched_left_padded(kw):
    model = randomized(**kw)
    fed = [[7, 1, 33], [12, 12, 0], [5, 6, 7]]  # tokens fed after each prompt
    B, T0 = len(PROMPTS), max(map(len, PROMPTS))
    idx = torch.zeros(B, T0, dtype=torch.long)
    pad = torch.zeros(B, T0, dtype=torch.bool)
    for b, p in enumerate(PROMPTS):
        idx[b, T0 - len(p):] = torch.tensor(p)
        pad[b, T0 - len(p):] = True
    cache = KVCache.for_model(model, B, T0 + 3)
    with torch.no_grad():
        step_logits = [model(idx, kv_cache=cache, padding_mask=pad)[0][:, -1]]
        for s in range(3):
            step_logits.append(model(torch.tensor([[f[s]] for f in fed]), kv_cache=cache)[0][:, -1])
        for b, p in enumerate(PROMPTS):
            full, _ = model(torch.tensor([p + fed[b]]))
            for s in range(4):
                torch.testing.assert_close(step_logits[s][b], full[0, len(p) - 1 + s], atol=1e-5, rtol=1e-5)
    assert cache.pos == T0 + 3 and cache.seen.tolist() == [len(p) + 3 for p in PROMPTS]


def test_chunked_prefill_after_a_prefix_equals_full():
    """Several tokens fed into a non-empty cache (the prefix + causal mask path)."""
    model = randomized()
    seq = torch.tensor([[3, 17, 5, 9, 1, 22, 8, 0, 14, 2]])
    cache = KVCache.for_model(model, 1, 10)
    with torch.no_grad():
        parts = [model(seq[:, a:b], kv_cache=cache)[0] for a, b in ((0, 4), (4, 9), (9, 10))]
        full, _ = model(seq)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ChatforgeError, match="KV cache is full"):
        model(seq[:, :1], kv_cache=cache)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}])
def test_greedy_generate_equals_naive_recomputation(kw):
    model = randomized(seed=3, **kw)
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert out == [naive_greedy(model, p, 12) for p in PROMPTS]
    assert len(set(map(tuple, out))) > 1  # the rows really differ


def test_decode_steps_feed_one_token_each(monkeypatch):
    """After the prefill every forward pass sees only the new token (O(T) per step)."""
    model = randomized()
    lengths = []
    original = model.forward_hidden

    def spy(idx, **kw):
        lengths.append(idx.shape[1])
        return original(idx, **kw)

    monkeypatch.setattr(model, "forward_hidden", spy)
    generate(model, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert lengths == [7, 1, 1, 1, 1, 1]


def test_generate_under_bf16_autocast_runs_and_restores_mode():
    model = randomized().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, PROMPTS, max_new_tokens=5, temperature=0.8, seed=0)
    assert [len(o) for o in out] == [5, 5, 5] and all(0 <= t < V for o in out for t in o)
    assert model.training  # the caller's mode is back
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------- sampling rules


def test_seed_makes_sampling_reproducible():
    model = randomized()
    a = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=123)
    b = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=123)
    c = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=124)
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = randomized(seed=5)
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=1) == greedy
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=2) == greedy
    sampled = generate(model, PROMPTS, max_new_tokens=10, temperature=1.5, seed=3)
    assert sampled != greedy  # so the two checks above could have failed


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isfinite(adjust_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    # 0.5 < 0.7 so the second token (0.3) is needed; 0.8 >= 0.7 so nothing more.
    assert torch.isfinite(adjust_logits(logits, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(adjust_logits(logits, top_p=0.81)).tolist() == [[True, False, True, True]]
    probs = adjust_logits(logits, top_p=0.7).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.0, 0.375, 0.0]]))


def test_repetition_penalty_lowers_repeated_tokens_probability():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    base = adjust_logits(logits).softmax(-1)
    penalised = adjust_logits(logits, repetition_penalty=1.5, seen=seen).softmax(-1)
    assert penalised[0, 0] < base[0, 0] and penalised[0, 2] < base[0, 2]  # positive and negative logits
    assert penalised[0, 1] > base[0, 1] and penalised[0, 3] > base[0, 3]
    torch.testing.assert_close(adjust_logits(logits, repetition_penalty=1.5, seen=seen),
                               torch.tensor([[2.0 / 1.5, 1.0, -1.5, 0.5]]))
    # End to end: greedy decoding of a random model loops; a penalty breaks the loops.
    model = randomized(seed=2)
    plain = generate(model, PROMPTS, max_new_tokens=30, temperature=0.0)
    penalised_out = generate(model, PROMPTS, max_new_tokens=30, temperature=0.0, repetition_penalty=5.0)

    def repeats(outs, prompts):
        return sum(len(o) - len(set(o) - set(p)) for o, p in zip(outs, prompts))

    assert repeats(penalised_out, PROMPTS) < repeats(plain, PROMPTS)


def test_temperature_zero_is_argmax_and_sampler_uses_generator():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    assert sample_next_token(logits, temperature=0.0).tolist() == logits.argmax(-1).tolist()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert sample_next_token(logits, generator=g1).tolist() == sample_next_token(logits, generator=g2).tolist()


# --------------------------------------------------------------------------- stops, streaming, errors


def test_stop_tokens_end_each_sequence_independently():
    model = randomized(seed=3)
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    stop = free[0][2]
    assert stop not in free[0][:2]
    expected = [o[:o.index(stop)] if stop in o else o for o in free]
    assert len({len(e) for e in expected}) > 1  # rows stop at different times (or not at all)
    assert generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, stop_tokens=[stop]) == expected
    # Several stop tokens: each row ends at the first of any of them.
    stops = {free[0][1], free[2][4]}
    expected = [next((o[:i] for i, t in enumerate(o) if t in stops), o) for o in free]
    assert generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, stop_tokens=stops) == expected


def test_stream_yields_tokens_one_by_one_like_generate():
    model = randomized(seed=4)
    full = generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=0.9, seed=11)[0]
    it = stream(model, PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=11)
    assert next(it) == full[0]  # available before the rest is decoded
    assert [full[0], *it] == full
    stop = full[5]
    cut = full[:full.index(stop)]
    assert list(stream(model, PROMPTS[0], 8, temperature=0.9, seed=11, stop_tokens=[stop])) == cut


def test_bad_generation_requests_are_clear_errors():
    model = randomized()  # block_size 48
    with pytest.raises(ChatforgeError, match=r"prompt of 7 tokens \+ max_new_tokens=42 = 49.*block_size=48"):
        generate(model, PROMPTS, max_new_tokens=42)
    with pytest.raises(ChatforgeError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ChatforgeError, match=r"prompt 0 has invalid token ids \(not integers in \[0, 40\)\)"):
        generate(model, [[1, 40]], max_new_tokens=2)
    with pytest.raises(ChatforgeError, match="temperature"):
        generate(model, [[1]], max_new_tokens=2, temperature=-1)
    with pytest.raises(ChatforgeError, match="top_p"):
        stream(model, [1], max_new_tokens=2, top_p=0.0)  # raised at the call, not at next()
    with pytest.raises(ChatforgeError, match="differs from the model's device"):
        generate(model, [[1]], max_new_tokens=2, device="meta")
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]
