"""The continuous-batching engine: same tokens as ``generate``, joins mid-way, stops, cancel, limits, async."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from serve_fixtures import ascii_model, save_tiny_model

from chatforge.chat.template import render_prompt, stop_token_ids
from chatforge.device import resolve_precision
from chatforge.errors import ChatforgeError
from chatforge.model import GPT, generate
from chatforge.serve import engine as engine_module
from chatforge.serve.app import ServeSettings, load_models
from chatforge.serve.engine import (
    Detokenizer,
    Engine,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    SlotKVCache,
)
from chatforge.tokenizer.byte import ByteTokenizer

TOK = ByteTokenizer()


def tiny_model(seed: int = 0, block_size: int = 128, **kw) -> GPT:
    return ascii_model(seed, block_size, **kw)


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture(scope="module")
def slow_model() -> GPT:
    """The same weights, but every forward takes 3 ms more: a 110-token request lasts a third of a
    second, so a test can act on it mid-way whatever the machine's load."""
    m = tiny_model()
    forward = m.forward_hidden

    def slow(idx, **kw):
        time.sleep(0.003)
        return forward(idx, **kw)

    m.forward_hidden = slow
    return m


@pytest.fixture
def engine(model):
    """fp32, so that its tokens equal ``generate(..., dtype="fp32")`` exactly (bf16: see the tolerance test)."""
    with Engine(model, TOK, max_batch=4, max_queue=8, dtype="fp32") as eng:
        yield eng


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def wait_until(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


PROMPTS = [list(b"Hello there"), [TOK.bos_id], list(b"a"), list(b"The quick brown fox jumps over the lazy dog"),
           list(b"0123456789" * 3)]


# --------------------------------------------------------------------------- same tokens as generate


def test_simultaneous_requests_match_generate_alone(model, engine):
    refs = [generate(model, [p], 30, temperature=0, dtype="fp32")[0] for p in PROMPTS]
    handles = [engine.submit(p, greedy(30)) for p in PROMPTS]  # 5 requests, 4 slots: one waits for a slot
    for h, ref in zip(handles, refs):
        h.wait(10)
        assert h.token_ids == ref
        assert h.finish_reason == "length" and h.completion_tokens == 30
        assert h.text == TOK.decode(ref)


def test_request_joining_mid_way_gets_the_same_tokens(model, engine):
    long_p, late_p = PROMPTS[3], PROMPTS[0]
    ref_long = generate(model, [long_p], 80, temperature=0, dtype="fp32")[0]
    ref_late = generate(model, [late_p], 25, temperature=0, dtype="fp32")[0]
    late: list = []
    forwards = 0

    def submit_late_at_step_10(module, args):
        # Runs in the engine thread at the start of each forward: the 11th forward is the first
        # request's 10th decode step, so the late request is admitted at the next step, whatever
        # the machine's load (a consumer thread reading events could fall any number of steps behind).
        nonlocal forwards
        forwards += 1
        if forwards == 11:
            late.append(engine.submit(late_p, greedy(25)))

    hook = model.blocks[0].register_forward_pre_hook(submit_late_at_step_10)
    try:
        first = engine.submit(long_p, greedy(80))
        first.wait(10)
        late[0].wait(10)
    finally:
        hook.remove()
    assert first.token_ids == ref_long
    assert late[0].token_ids == ref_late
    # the late request's 24 decode steps were shared with the first request's 79
    assert engine.stats()["steps"] == 79


def test_chat_uses_template_and_stops_at_end_of_turn(model, engine):
    messages = [{"role": "user", "content": "hi"}]
    ids = render_prompt(messages, TOK)
    ref = generate(model, [ids], 20, temperature=0, dtype="fp32", stop_tokens=stop_token_ids(TOK))[0]
    h = engine.chat(messages, greedy(20))
    h.wait(10)
    assert h.prompt_tokens == len(ids) and h.token_ids == ref


def test_stop_token_ends_with_stop(model, engine):
    ref = generate(model, [PROMPTS[0]], 20, temperature=0, dtype="fp32")[0]
    h = engine.submit(PROMPTS[0], greedy(20), stop_token_ids=[ref[5]])
    h.wait(10)
    cut = ref.index(ref[5])
    assert h.token_ids == ref[:cut] and h.finish_reason == "stop"


# --------------------------------------------------------------------------- stop strings and detokenisation


def test_stop_string_cuts_exactly(model, engine):
    text = TOK.decode(generate(model, [PROMPTS[3]], 60, temperature=0, dtype="fp32")[0])
    stop = text[20:23]
    expected = text[:text.find(stop)]
    h = engine.submit(PROMPTS[3], greedy(60, stop=("never-there", stop)))
    streamed = "".join(ev.text for ev in h)
    assert h.finish_reason == "stop"
    assert h.text == expected and streamed == expected
    assert h.completion_tokens < 60


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes():
    d = Detokenizer(stops=("STOP",))
    out = [d.push(b) for b in (b"ab", b"S", b"T", b"x", b"\xe2", b"\x82", b"\xac", b"ST", b"OP", b"tail")]
    # "S" and "T" are held (could start STOP) until "x" shows they do not; the euro sign waits for its 3 bytes
    assert out == ["ab", "", "", "STx", "", "", "\u20ac", "", "", ""]
    assert d.stopped and d.text == "abSTx\u20ac" and d.flush() == ""
    d2 = Detokenizer(stops=("END",))
    assert d2.push(b"xE") == "x" and d2.push(b"N") == "" and d2.flush() == "EN"  # never completed: released
    d3 = Detokenizer()
    assert d3.push(b"\xc3") == "" and d3.flush() == "\ufffd"  # a truncated character is released at the end


def test_split_characters_are_not_streamed_half_done():
    # Only two byte tokens can win: 0xC3 (starts a 2-byte character) and 0xA9 (continues one), in an order
    # the hidden states decide. Text must never be emitted ending in a half character (U+FFFD).
    m = tiny_model(seed=3)
    with torch.no_grad():
        m.output_weight[:] = 0.0
        m.output_weight[0xC3] = 1.0
        m.output_weight[0xA9] = -1.0
    with Engine(m, TOK, max_batch=2) as eng:
        h = eng.submit(list(b"x"), greedy(12))
        events = list(h)
    assert set(h.token_ids) <= {0xC3, 0xA9} and len(events) == 12
    assert not any(ev.text.endswith("\ufffd") for ev in events[:-1])
    assert "".join(ev.text for ev in events) == h.text == TOK.decode(h.token_ids)


# --------------------------------------------------------------------------- cancel, limits, errors


def test_cancel_frees_the_slot(slow_model):
    with Engine(slow_model, TOK, max_batch=1, max_queue=4) as eng:
        h = eng.submit(PROMPTS[0], greedy(110))
        it = iter(h)
        for _ in range(3):
            next(it)
        h.cancel()
        list(it)
        assert h.finish_reason == "cancelled" and h.completion_tokens < 110
        wait_until(lambda: eng.stats()["running"] == 0)
        assert eng.stats()["requests_cancelled"] == 1
        # the single slot is free again
        h2 = eng.submit(PROMPTS[2], greedy(5))
        h2.wait(10)
        assert h2.finish_reason == "length" and len(h2.token_ids) == 5


def test_queue_full_and_cancel_while_waiting(slow_model):
    with Engine(slow_model, TOK, max_batch=1, max_queue=1) as eng:
        a = eng.submit(PROMPTS[0], greedy(110))
        wait_until(lambda: eng.stats()["running"] == 1)
        b = eng.submit(PROMPTS[1], greedy(5))  # waits for the slot
        assert eng.stats()["waiting"] == 1
        with pytest.raises(QueueFull, match="max_batch 1, max_queue 1"):
            eng.submit(PROMPTS[2], greedy(5))
        b.cancel()
        a.cancel()
        a.wait(10)
        b.wait(10)
        assert a.finish_reason == b.finish_reason == "cancelled" and b.completion_tokens == 0
        wait_until(lambda: eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0)


def test_prompt_too_long_names_the_numbers(model, engine):
    with pytest.raises(PromptTooLong, match=r"100 tokens and max_tokens is 40: 140 tokens .* context of 128"):
        engine.submit([65] * 100, greedy(40))
    with pytest.raises(ChatforgeError, match="temperature"):
        engine.submit([65], SamplingParams(temperature=-1))
    with pytest.raises(ChatforgeError, match="invalid token ids"):
        engine.submit([65, 10_000], greedy(3))
    with pytest.raises(ChatforgeError, match="empty"):
        engine.submit([], greedy(3))


def test_submit_needs_a_started_engine(model):
    with pytest.raises(ChatforgeError, match="start"):
        Engine(model, TOK).submit([65], greedy(2))


def test_max_tokens_zero_finishes_at_once(engine):
    h = engine.submit(PROMPTS[0], greedy(0))
    assert h.wait(10) == "" and h.finish_reason == "length" and h.completion_tokens == 0


# --------------------------------------------------------------------------- sampling, logprobs, async, stats


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(model, engine):
    params = dict(max_tokens=30, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.1)
    alone = engine.submit(PROMPTS[0], SamplingParams(seed=7, **params))
    alone.wait(10)
    noise = [engine.submit(p, SamplingParams(**params)) for p in PROMPTS[1:3]]  # unseeded neighbours
    again = engine.submit(PROMPTS[0], SamplingParams(seed=7, **params))
    other = engine.submit(PROMPTS[0], SamplingParams(seed=8, **params))
    for h in [*noise, again, other]:
        h.wait(10)
    assert again.token_ids == alone.token_ids and len(alone.token_ids) > 0
    assert other.token_ids != alone.token_ids


def test_logprobs_match_a_direct_forward(model, engine):
    h = engine.submit(PROMPTS[0], greedy(8, logprobs=3))
    events = list(h)
    seq = torch.tensor([PROMPTS[0] + h.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq)[0][0].float(), dim=-1)
    n = len(PROMPTS[0])
    for k, ev in enumerate(events):
        row = lp[n - 1 + k]
        assert ev.logprob == pytest.approx(float(row[ev.token_id]), abs=1e-4)
        assert len(ev.top_logprobs) == 3 and ev.top_token_ids[0] == ev.token_id  # greedy: the best one
        assert [v for _, v in ev.top_logprobs] == sorted((v for _, v in ev.top_logprobs), reverse=True)
        assert ev.top_logprobs[0][0] == TOK.id_to_token(ev.token_id)

    scores = engine.prompt_logprobs(PROMPTS[3])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPTS[3]]))[0][0], dim=-1)
    assert scores[0] is None and len(scores) == len(PROMPTS[3])
    for i in range(1, len(PROMPTS[3])):
        assert scores[i] == pytest.approx(float(lp[i - 1, PROMPTS[3][i]]), abs=1e-4)


def test_async_iteration_and_result(model, engine):
    ref = generate(model, [PROMPTS[0]], 12, temperature=0, dtype="fp32")[0]

    async def main() -> tuple[list[int], str, str]:
        a = engine.submit(PROMPTS[0], greedy(12))
        b = engine.submit(PROMPTS[0], greedy(12))
        ids = [ev.token_id async for ev in a]
        return ids, await b.result(), a.text

    ids, text_b, text_a = asyncio.run(main())
    assert ids == ref and text_a == text_b == TOK.decode(ref)


def test_stats_count_steps_and_tokens(model):
    with Engine(model, TOK, max_batch=4) as eng:
        hs = [eng.submit(p, greedy(10)) for p in PROMPTS[:3]]
        for h in hs:
            h.wait(10)
        s = eng.stats()
    assert s["tokens_generated"] == 30 and s["requests_finished"] == 3
    assert s["prefill_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert 9 <= s["steps"] <= 27  # the first token comes from the prefill; decode steps are shared
    assert s["running"] == s["waiting"] == 0 and s["max_batch"] == 4


@pytest.mark.parametrize("key_smear", [False, True])
def test_slot_cache_decode_equals_full_forward(model, key_smear):
    """Rows of different lengths, moved between slots, decode as if alone (with smeared keys the slot
    keeps each row's last raw keys, and a move carries them)."""
    model = tiny_model(key_smear=True) if key_smear else model
    cache = SlotKVCache.for_model(model, 3)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    with torch.no_grad():
        for r, p in enumerate(prompts):
            cache.begin_prefill(r)
            model.forward_hidden(torch.tensor([p]), kv_cache=cache)
            cache.lengths[r] = len(p)
        cache.move(2, 1)  # drop row 1: row 2 takes its place
        rows = [prompts[0], prompts[2]]
        cache.begin_decode(2)
        logits, _ = model(torch.tensor([[70], [71]]), kv_cache=cache)
        for k, (p, t) in enumerate(zip(rows, [70, 71])):
            full, _ = model(torch.tensor([p + [t]]))
            torch.testing.assert_close(logits[k, -1], full[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.lengths[:2] == [len(prompts[0]) + 1, len(prompts[2]) + 1]


def test_stop_ends_unfinished_requests_and_a_failed_step_ends_only_its_requests(model, slow_model):
    eng = Engine(slow_model, TOK, max_batch=2)
    eng.start()
    h = eng.submit(PROMPTS[0], greedy(110))
    next(iter(h))
    eng.stop()
    assert h.wait(10) is not None and h.finish_reason == "cancelled"

    calls = {"n": 0}
    forward = model.forward_hidden

    def flaky(idx, **kw):  # the third forward (a decode step) fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(idx, **kw)

    with Engine(model, TOK, max_batch=2, dtype="fp32") as eng:
        eng.model.forward_hidden = flaky
        try:
            h = eng.submit(PROMPTS[0], greedy(20))
            h.wait(10)
            assert h.finish_reason == "error" and "out of memory" in h.error
            ok = eng.submit(PROMPTS[2], greedy(5))  # the engine keeps serving
            ok.wait(10)
            ref = generate(model, [PROMPTS[2]], 5, temperature=0, dtype="fp32")[0]
            assert ok.finish_reason == "length" and ok.token_ids == ref
        finally:
            del eng.model.forward_hidden


# --------------------------------------------------------------------------- vectorised sampling, precision

# (temperature, top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty) per request:
# greedy, greedy with each penalty, and samplers
SETTINGS = [(0.0, None, None, 1.0, 0.0, 0.0), (0.0, None, None, 1.3, 0.0, 0.0), (1.3, 20, None, 1.0, 0.0, 0.0),
            (0.8, None, 0.9, 1.0, 0.0, 0.0), (1.0, 50, 0.95, 1.2, 0.0, 0.0), (0.0, None, None, 1.0, 0.9, 0.3),
            (1.0, None, None, 1.0, 0.5, 0.5)]


MIXED_PROMPTS = [PROMPTS[i % len(PROMPTS)] for i in range(len(SETTINGS))]


def mixed_params(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=n, temperature=t, top_k=k, top_p=p, repetition_penalty=r, frequency_penalty=f,
                           presence_penalty=pr, seed=10 + i) for i, (t, k, p, r, f, pr) in enumerate(SETTINGS)]


def test_one_sampling_call_per_step_over_rows_with_different_settings(model, monkeypatch):
    sizes: list[int] = []
    real = engine_module.sample_rows

    def spy(adjusted, rows, uniforms):
        sizes.append(adjusted.shape[0])
        return real(adjusted, rows, uniforms)

    monkeypatch.setattr(engine_module, "sample_rows", spy)
    with Engine(model, TOK, max_batch=8, dtype="fp32") as eng:
        handles = [eng.submit(p, params) for p, params in zip(MIXED_PROMPTS, mixed_params(30))]
        for h in handles:
            h.wait(10)
        steps = eng.stats()["steps"]
    assert all(h.completion_tokens == 30 for h in handles)
    assert len(sizes) == steps + len(handles)  # one call per decode step, and one per prefill
    assert max(sizes) == len(handles)  # every row, each with its own settings, in one call


def test_mixed_batch_gives_each_request_its_tokens_alone(model):
    """Greedy rows are unchanged and seeded rows reproducible whatever shares their batch, and both
    equal ``generate`` alone (the per-row reference: same rules, same seeded draws)."""
    n = 40
    alone = [generate(model, [p], n, temperature=t, top_k=k, top_p=tp, repetition_penalty=r, seed=10 + i,
                      dtype="fp32", frequency_penalty=f, presence_penalty=pr)[0]
             for i, (p, (t, k, tp, r, f, pr)) in enumerate(zip(MIXED_PROMPTS, SETTINGS))]
    with Engine(model, TOK, max_batch=8, dtype="fp32") as eng:
        noise = [eng.submit(p, SamplingParams(max_tokens=n, temperature=1.5)) for p in PROMPTS[:2]]  # unseeded
        batched = [eng.submit(p, params) for p, params in zip(MIXED_PROMPTS, mixed_params(n))]
        for h in [*noise, *batched]:
            h.wait(10)
        single = []
        for p, params in zip(MIXED_PROMPTS, mixed_params(n)):  # and each one through the engine by itself
            h = eng.submit(p, params)
            h.wait(10)
            single.append(h.token_ids)
    assert [h.token_ids for h in batched] == alone == single
    greedy_refs = [generate(model, [p], n, temperature=0, dtype="fp32")[0] for p in MIXED_PROMPTS]
    # the samplers really sampled, and the penalised greedy rows are not plain greedy
    assert all(a != g for a, g, st in zip(alone, greedy_refs, SETTINGS) if st != SETTINGS[0])


def test_bf16_engine_runs_bf16_and_stays_near_fp32(model):
    dtypes: list[torch.dtype] = []
    hook = model.blocks[0].attn.c_q.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    try:
        with Engine(model, TOK, max_batch=4, dtype="bf16") as eng:
            assert eng.dtype == "bf16"
            h = eng.submit(PROMPTS[0], greedy(12, logprobs=0))
            events = list(h)
            scores = eng.prompt_logprobs(PROMPTS[3])
    finally:
        hook.remove()
    assert len(dtypes) == 12 + 1 and set(dtypes) == {torch.bfloat16}  # 12 decode forwards + the prompt score
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPTS[0] + h.token_ids]))[0][0], dim=-1)
        lp_prompt = torch.log_softmax(model(torch.tensor([PROMPTS[3]]))[0][0], dim=-1)
    n = len(PROMPTS[0])
    assert [ev.logprob for ev in events] == pytest.approx(
        [float(lp[n - 1 + k, ev.token_id]) for k, ev in enumerate(events)], abs=0.05)
    # unlikely prompt tokens have logprobs near -20 here: bf16 is good to about 1-2% of them
    assert scores[1:] == pytest.approx([float(lp_prompt[i - 1, t]) for i, t in enumerate(PROMPTS[3]) if i],
                                       rel=0.03, abs=0.05)
    assert Engine(model, TOK).dtype == resolve_precision("auto", torch.device("cpu")).name
    with pytest.raises(ChatforgeError, match="dtype: 'fp8' is not allowed"):
        Engine(model, TOK, dtype="fp8")


def test_serve_settings_give_each_engine_its_dtype(tmp_path):
    path = save_tiny_model(tmp_path / "m")
    for dtype in ("fp32", "bf16"):
        served = load_models(ServeSettings(models=[("m", path)], device="cpu", dtype=dtype))
        assert served["m"].engine.dtype == dtype
