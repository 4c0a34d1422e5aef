"""KV-cache decoding and sampling: cache == full recomputation, batching, sampling rules, stops, streaming,
finish reasons and log-probabilities, vectorised per-row sampling, bf16."""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Sequence

import pytest
import torch
from helpers import random_gpt

from chatforge.device import resolve_precision
from chatforge.errors import ChatforgeError
from chatforge.model import (
    GPT,
    KVCache,
    adjust_logits,
    generate,
    generate_details,
    sample_next_token,
    stream,
)
from chatforge.model.generate import SamplingRows, adjust_logits_rows, sample_rows

V = 40


def randomized(seed: int = 0, **kw) -> GPT:
    """Random weights everywhere (helpers.random_gpt) on this file's small default shape."""
    return random_gpt(seed, **{**dict(vocab_size=V, block_size=48, n_layer=2, n_embd=32, n_head=4), **kw})


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference decoder: re-run the whole sequence for every token, no cache."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[3, 17, 5, 9, 1, 22, 8], [4], [30, 2, 11]]


# --------------------------------------------------------------------------- cache == recompute


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": True}, {"key_smear": True},
                                {"key_smear": True, "n_kv_head": 2}])
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


@pytest.mark.parametrize("kw", [{}, {"key_smear": True}])
def test_chunked_prefill_after_a_prefix_equals_full(kw):
    """Several tokens fed into a non-empty cache (the prefix + causal mask path)."""
    model = randomized(**kw)
    seq = torch.tensor([[3, 17, 5, 9, 1, 22, 8, 0, 14, 2]])
    cache = KVCache.for_model(model, 1, 10)
    with torch.no_grad():
        parts = [model(seq[:, a:b], kv_cache=cache)[0] for a, b in ((0, 4), (4, 9), (9, 10))]
        full, _ = model(seq)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ChatforgeError, match="KV cache is full"):
        model(seq[:, :1], kv_cache=cache)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"key_smear": True}])
def test_greedy_generate_equals_naive_recomputation(kw):
    model = randomized(seed=3, **kw)
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, dtype="fp32")
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


def test_bf16_cached_decode_is_close_to_recomputation():
    """bf16 cannot be bit-exact against fp32: the cache must still equal recomputation in bf16, and bf16
    stay near fp32 (logits here span about +-5)."""
    model = randomized(n_kv_head=2)
    prompt, fed = PROMPTS[0], [7, 1, 33, 5]
    with torch.no_grad():
        full32, _ = model(torch.tensor([prompt + fed]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full16 = model(torch.tensor([prompt + fed]))[0].float()
            cache = KVCache.for_model(model, 1, len(prompt) + len(fed))
            steps = [model(torch.tensor([prompt]), kv_cache=cache)[0][0, -1]]
            steps += [model(torch.tensor([[t]]), kv_cache=cache)[0][0, -1] for t in fed]
    assert cache.k.dtype == torch.bfloat16  # the cache takes the autocast dtype of the keys
    n = len(prompt) - 1
    torch.testing.assert_close(torch.stack(steps).float(), full16[0, n:], atol=2e-2, rtol=0)
    torch.testing.assert_close(full16, full32, atol=0.25, rtol=0)


def test_dtype_sets_the_forward_precision_and_the_head_stays_fp32(monkeypatch):
    model = randomized()
    matmuls: list[torch.dtype] = []  # output dtype of a projection inside the blocks
    heads: list[tuple[torch.dtype, torch.dtype, bool]] = []  # LM head: input, output, autocast on
    hook = model.blocks[0].attn.c_q.register_forward_hook(lambda m, a, out: matmuls.append(out.dtype))
    original = model.logits_from_hidden

    def head(hidden):
        out = original(hidden)
        heads.append((hidden.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(model, "logits_from_hidden", head)
    try:
        for dtype, want in [("bf16", torch.bfloat16), ("fp32", torch.float32),
                            ("auto", resolve_precision("auto", torch.device("cpu")).dtype)]:
            matmuls.clear()
            heads.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):  # "fp32" wins over the caller's autocast
                generate(model, PROMPTS, max_new_tokens=3, temperature=0.0, dtype=dtype)
            assert len(matmuls) == 3 and set(matmuls) == {want}, dtype
            assert len(heads) == 3 and set(heads) == {(torch.float32, torch.float32, False)}, dtype
    finally:
        hook.remove()
    with pytest.raises(ChatforgeError, match="dtype: 'half' is not allowed"):
        generate(model, PROMPTS, max_new_tokens=3, dtype="half")


def test_bf16_greedy_logprobs_are_close_to_fp32():
    model = randomized(seed=3)
    g16 = generate_details(model, PROMPTS, max_new_tokens=8, temperature=0.0, dtype="bf16")
    for p, g in zip(PROMPTS, g16):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + g.tokens]))[0][0].double(), dim=-1)
        want = [lp[len(p) - 1 + i, t].item() for i, t in enumerate(g.tokens)]
        assert g.logprobs == pytest.approx(want, abs=0.05)


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


def test_inverse_cdf_draws_follow_the_distribution_and_never_pick_a_removed_token():
    probs = torch.tensor([0.5, 0.05, 0.3, 0.15])
    n = 20_000
    rows = SamplingRows.build([(1.0, None, None, 1.0)] * n, "cpu")
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    drawn = sample_rows(probs.log().expand(n, 4), rows, u)
    freq = torch.bincount(drawn, minlength=4).double() / n
    torch.testing.assert_close(freq, probs.double(), atol=0.012, rtol=0)  # 3.4 standard errors
    # Removed tokens (-inf) at either end of the range of u, including u * total rounding up to total.
    adjusted = torch.tensor([[float("-inf"), 0.0, 0.0, float("-inf")]] * 2)
    edge = torch.tensor([0.0, 1.0 - 2.0 ** -24])
    assert sample_rows(adjusted, SamplingRows.build([(1.0, None, None, 1.0)] * 2, "cpu"), edge).tolist() == [1, 2]


# one (temperature, top_k, top_p, repetition_penalty) per row, every rule in some row and mixed in others
MIXED = [(0.0, None, None, 1.0), (0.0, None, None, 1.5), (0.7, 5, None, 1.0), (1.3, None, 0.8, 1.0),
         (1.0, 10, 0.9, 1.3), (2.0, 1, None, 1.0), (0.9, None, 1e-6, 1.0), (1.0, None, None, 1.0),
         (0.0, None, None, 1.0, 0.8, 0.0), (1.0, 20, None, 1.2, 0.5, 0.4), (0.8, None, None, 1.0, -0.5, 1.5)]


def test_vectorised_rows_equal_each_row_sampled_alone():
    """The engine's path: one call over rows with different settings == each row on its own."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(MIXED), V, generator=gen) * 3
    seen = torch.rand(len(MIXED), V, generator=gen) < 0.3
    counts = torch.randint(0, 4, (len(MIXED), V), generator=gen).float() * (torch.rand(len(MIXED), V) < 0.2)
    u = torch.rand(len(MIXED), generator=gen)
    rows = SamplingRows.build(MIXED, "cpu")
    adjusted = adjust_logits_rows(logits, rows, seen, counts)
    batch = sample_rows(adjusted, rows, u)
    for i, setting in enumerate(MIXED):
        one = SamplingRows.build([setting], "cpu")
        alone = adjust_logits_rows(logits[i:i + 1], one, seen[i:i + 1], counts[i:i + 1])
        assert torch.equal(alone[0], adjusted[i]), setting
        assert sample_rows(alone, one, u[i:i + 1]).item() == batch[i].item(), setting
        t, k, p, rp, f, pr = (*setting, 0.0, 0.0)[:6]  # the scalar API agrees (t=0: argmax of the penalised logits)
        if t > 0:
            assert torch.equal(adjust_logits(logits[i:i + 1], t, k, p, rp, seen[i:i + 1], f, pr, counts[i:i + 1])[0],
                               adjusted[i])
    assert batch[0].item() == logits[0].argmax().item()
    assert batch[5].item() == logits[5].argmax().item() and batch[6].item() == logits[6].argmax().item()


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


def test_details_include_the_stop_token_and_the_finish_reason():
    model = randomized(seed=3)
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0, dtype="fp32")
    stop = free[0][2]
    details = generate_details(model, PROMPTS, max_new_tokens=12, temperature=0.0, stop_tokens=[stop],
                               dtype="fp32")
    stopped = [stop in o for o in free]
    assert stopped[0] and not all(stopped)  # both kinds of row
    for o, d in zip(free, details):
        if stop in o:
            assert d.tokens == o[:o.index(stop) + 1] and d.finish_reason == "stop"  # the stop token is in
            assert d.content_tokens == o[:o.index(stop)]
        else:
            assert d.tokens == o and len(d.tokens) == 12 and d.finish_reason == "length"
            assert d.content_tokens == o
        assert len(d.logprobs) == len(d.tokens)
    assert [d.content_tokens for d in details] == generate(model, PROMPTS, max_new_tokens=12, temperature=0.0,
                                                           stop_tokens=[stop], dtype="fp32")
    assert [(d.tokens, d.finish_reason) for d in generate_details(model, PROMPTS, 0)] == [([], "length")] * 3


def reference_logprobs(logits: torch.Tensor, seen: set[int], temperature: float, top_k: int | None,
                       top_p: float | None, penalty: float, frequency: float = 0.0, presence: float = 0.0,
                       generated: Sequence[int] = ()) -> torch.Tensor:
    """The sampling distribution of one position, written out independently of ``adjust_logits``:
    penalty on seen tokens, frequency and presence penalties on the tokens generated so far, then
    (unless greedy: temperature 1, no top-k/top-p) temperature, top-k, top-p."""
    x = logits.double().clone()
    for t in seen:
        x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
    for t in set(generated):
        x[t] -= frequency * list(generated).count(t) + presence
    if temperature == 0:
        return torch.log_softmax(x, dim=-1)
    x = x / temperature
    if top_k is not None:
        x[x < torch.sort(x, descending=True).values[top_k - 1]] = -math.inf
    if top_p is not None:
        probs, keep, total = torch.softmax(x, dim=-1), set(), 0.0
        for i in torch.argsort(x, descending=True).tolist():
            keep.add(i)
            total += probs[i].item()
            if total >= top_p:
                break
        x[[i for i in range(len(x)) if i not in keep]] = -math.inf
    return torch.log_softmax(x, dim=-1)


@pytest.mark.parametrize("setting", [*MIXED[:5], *MIXED[8:10]],
                         ids=["greedy", "greedy-penalty", "top_k", "top_p", "all", "greedy-frequency", "counted"])
def test_logprobs_equal_a_teacher_forced_recomputation(setting):
    """Each token's logprob == log P(token) under the adjusted distribution at its position, recomputed
    with one full forward over prompt + generated tokens (no cache, no batch, no padding)."""
    temperature, top_k, top_p, penalty, frequency, presence = (*setting, 0.0, 0.0)[:6]
    model = randomized(seed=6)
    stop = 13
    details = generate_details(model, PROMPTS, max_new_tokens=15, temperature=temperature, top_k=top_k,
                               top_p=top_p, repetition_penalty=penalty, stop_tokens=[stop], seed=4, dtype="fp32",
                               frequency_penalty=frequency, presence_penalty=presence)
    for p, d in zip(PROMPTS, details):
        assert d.tokens and len(d.logprobs) == len(d.tokens)
        with torch.no_grad():
            logits = model(torch.tensor([p + d.tokens]))[0][0]
        for i, tok in enumerate(d.tokens):
            ref = reference_logprobs(logits[len(p) - 1 + i], set(p + d.tokens[:i]), temperature, top_k, top_p,
                                     penalty, frequency, presence, d.tokens[:i])
            assert math.isfinite(d.logprobs[i]) and d.logprobs[i] == pytest.approx(ref[tok].item(), abs=1e-4)
        if temperature == 0:  # greedy: the argmax of the penalised logits
            assert all(ref_lp <= 0 for ref_lp in d.logprobs)


def test_top_k_one_gives_logprob_zero_and_sampled_logprobs_differ_from_the_raw_model():
    model = randomized(seed=5)
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, dtype="fp32")
    top1 = generate_details(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=1, dtype="fp32")
    assert [d.tokens for d in top1] == greedy
    assert all(lp == 0.0 for d in top1 for lp in d.logprobs)  # one token left: probability exactly 1
    hot = generate_details(model, PROMPTS, max_new_tokens=10, temperature=2.0, seed=1, dtype="fp32")
    for p, d in zip(PROMPTS, hot):
        with torch.no_grad():
            logits = model(torch.tensor([p + d.tokens]))[0][0, len(p) - 1:-1]
        raw = torch.log_softmax(logits, -1).gather(1, torch.tensor(d.tokens)[:, None])[:, 0]
        hot_ref = torch.log_softmax(logits / 2.0, -1).gather(1, torch.tensor(d.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(d.logprobs), hot_ref, atol=1e-4, rtol=0)
        assert not torch.allclose(torch.tensor(d.logprobs), raw, atol=1e-2)


def test_stream_yields_tokens_one_by_one_like_generate():
    model = randomized(seed=4)
    full = generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=0.9, seed=11)[0]
    it = stream(model, PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=11)
    assert next(it) == full[0]  # available before the rest is decoded
    assert [full[0], *it] == full
    stop = full[5]
    cut = full[:full.index(stop)]
    assert list(stream(model, PROMPTS[0], 8, temperature=0.9, seed=11, stop_tokens=[stop])) == cut


def test_stream_reports_the_finish_reason_and_details():
    model = randomized(seed=4)
    kw = dict(temperature=0.9, seed=11, dtype="fp32")
    full = generate_details(model, [PROMPTS[0]], 8, **kw)[0]
    it = stream(model, PROMPTS[0], 8, **kw)
    assert it.finish_reason is None and list(it) == full.tokens and it.finish_reason == "length"
    assert it.result.tokens == full.tokens and it.result.logprobs == pytest.approx(full.logprobs, abs=1e-6)
    stop = full.tokens[5]
    it = stream(model, PROMPTS[0], 8, stop_tokens=[stop], **kw)
    assert list(it) == full.tokens[:full.tokens.index(stop)] and it.finish_reason == "stop"
    assert it.result.tokens == full.tokens[:full.tokens.index(stop) + 1]  # the stop token is in the result


def test_stream_runs_callers_code_in_its_own_mode_and_a_dropped_stream_ends_its_thread():
    model = randomized().train()

    def helpers() -> int:
        return sum(t.name == "chatforge-stream" and t.is_alive() for t in threading.enumerate())

    before = helpers()
    it = stream(model, PROMPTS[0], 20, temperature=0.9, seed=1, dtype="bf16")
    for _ in range(3):
        next(it)
        # the decode's no_grad and autocast live in the helper thread, not in the caller's code
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    assert helpers() == before + 1 and not model.training  # eval mode while decoding, as before
    del it
    gc.collect()
    deadline = time.monotonic() + 10
    while helpers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert helpers() == before and model.training  # the helper ended and restored the mode


def test_a_finished_or_closed_stream_has_no_helper_thread_left():
    # A helper still inside torch when the interpreter exits aborts the process: chat must not leave one.
    model = randomized()
    helpers = [t for t in threading.enumerate() if t.name == "chatforge-stream" and t.is_alive()]
    full = generate_details(model, [PROMPTS[0]], 8, temperature=0.0)[0]
    for it in (stream(model, PROMPTS[0], 8, temperature=0.0),  # length
               stream(model, PROMPTS[0], 8, temperature=0.0, stop_tokens=[full.tokens[2]])):  # stop
        list(it)
        assert not it._thread.is_alive(), it.finish_reason
    it = stream(model, PROMPTS[0], 8, temperature=0.0)
    next(it)
    it.close()
    assert not it._thread.is_alive()
    assert [t for t in threading.enumerate() if t.name == "chatforge-stream" and t.is_alive()] == helpers


def test_a_frequency_penalty_breaks_a_greedy_loop_without_touching_the_prompt():
    # A model that always predicts "the token just seen" loops greedily; OpenAI's frequency penalty
    # counts only generated tokens, so the first step (the prompt's own tokens) is plain greedy.
    model = randomized(seed=3)
    plain = generate(model, [PROMPTS[1]], 24, temperature=0.0)[0]
    looped = max(plain.count(t) for t in set(plain))
    pen = generate(model, [PROMPTS[1]], 24, temperature=0.0, frequency_penalty=2.0)[0]
    assert pen[0] == plain[0]  # nothing generated yet: no penalty, even for tokens in the prompt
    assert max(pen.count(t) for t in set(pen)) < looped, (plain, pen)
    with pytest.raises(ChatforgeError, match=r"frequency_penalty must be in \[-2, 2\]"):
        generate(model, [[1]], 2, frequency_penalty=2.5)
    with pytest.raises(ChatforgeError, match="presence_penalty"):
        stream(model, [1], 2, presence_penalty=-3)


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


def test_a_failing_stream_raises_in_the_caller_without_a_finish_reason(monkeypatch):
    model = randomized().train()
    calls = {"n": 0}
    original = model.forward_hidden

    def flaky(idx, **kw):  # prefill, one decode step, then a failure
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return original(idx, **kw)

    monkeypatch.setattr(model, "forward_hidden", flaky)
    it = stream(model, PROMPTS[0], 10, temperature=0.0)
    next(it), next(it)
    with pytest.raises(RuntimeError, match="out of memory"):
        next(it)
    assert it.finish_reason is None and it.result is None and list(it) == []
    assert model.training  # the helper restored the caller's mode on its way out
