"""Batched KV-cache decoding with temperature, top-k, top-p, repetition/frequency/presence penalties and stop tokens.

One prefill runs all prompts at once, left-padded (see ``KVCache``); then each
step feeds one token per row through the cache, so a step costs O(T) attention
instead of re-running the whole sequence. Rows stop independently at a stop
token; the batch ends when every row has stopped or ``max_new_tokens`` were
produced. Finished rows keep being fed (their tokens are discarded) so that the
batch stays rectangular.

Three ways to call it:

- ``generate`` -> the new tokens of each prompt, without the stop token (for
  evaluation, samples, the CLI);
- ``generate_details`` -> one ``Generation`` per prompt: the tokens INCLUDING the
  stop token, the finish reason ("stop" or "length") and the log-probability of
  each token under the distribution it was drawn from (what RL rollouts need);
- ``stream`` -> one prompt's tokens as they are produced; the returned
  ``TokenStream`` tells the finish reason once it is exhausted.

Sampling order (as in Hugging Face ``generate`` and vLLM): repetition penalty,
frequency and presence penalties (OpenAI's, counting generated tokens only), then
temperature, top-k, top-p, then a draw. Every rule works on a whole batch of rows
at once, each row with its own settings (``SamplingRows``), so the serving engine,
whose rows are different requests, samples them all in one call. The draw is
inverse-CDF sampling from one uniform number per row: ``generate`` draws them from
a CPU ``torch.Generator`` seeded with ``seed`` (same model, prompts and seed =>
same tokens, on any device); the engine draws each seeded request's number from
that request's own generator, so it does not depend on what else is in the batch.

Temperature 0 is greedy decoding: the argmax after the penalties (top-k
and top-p do not apply). Its log-probabilities are, by convention, those of the
penalised logits at temperature 1: the model's own probability of the chosen
token, not 0.

Precision: ``dtype="auto"`` runs the forward under bf16 autocast where that is
faster (GPUs, AMX CPUs: ``resolve_precision``), "fp32" forces fp32 (even inside a
caller's autocast). The LM head, the logits and the log-probabilities are always
fp32: a bf16 head would round every logit by up to ~0.4%, noise that an RL
importance ratio exp(logp_new - logp_old) would see. The decode loop runs under
``torch.no_grad`` and one autocast region, not ``inference_mode`` and one region
per step: autocast caches its bf16 copy of each weight only outside inference
mode and only until the outermost region ends, and recasting every weight at
every step made bf16 decoding ~2-3x slower than fp32.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatforge.device import Precision
from chatforge.errors import ChatforgeError
from chatforge.model.compiled_decode import CompiledDecode, bucket_len, can_compile
from chatforge.model.gpt import GPT
from chatforge.model.kv_cache import KVCache
from chatforge.model.quantize import model_precision

log = logging.getLogger("chatforge.generate")

__all__ = [
    "Generation",
    "KVCache",
    "SamplingRows",
    "TokenStream",
    "adjust_logits",
    "adjust_logits_rows",
    "forward_autocast",
    "generate",
    "generate_details",
    "lm_logits",
    "sample_next_token",
    "sample_rows",
    "stream",
]


# --------------------------------------------------------------------------- results


@dataclass
class Generation:
    """One prompt's continuation.

    ``tokens`` are the new tokens, INCLUDING the stop token when the row stopped on
    one (``finish_reason`` "stop"); "length" means it was cut at ``max_new_tokens``.
    ``logprobs[i]`` is log P(tokens[i]) under the distribution it was sampled from
    (after repetition penalty, temperature, top-k, top-p; greedy: see the module
    docstring).
    """

    tokens: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)

    @property
    def content_tokens(self) -> list[int]:
        """The tokens without the stop token (what ``generate`` returns)."""
        return self.tokens[:-1] if self.finish_reason == "stop" else list(self.tokens)


# --------------------------------------------------------------------------- precision


def forward_autocast(precision: Precision) -> contextlib.AbstractContextManager:
    """``precision``'s autocast; for fp32 one that switches off any autocast the caller has on."""
    if precision.dtype == torch.float32:
        if torch.is_autocast_enabled(precision.device.type):
            return torch.autocast(precision.device.type, enabled=False)
        return contextlib.nullcontext()
    return precision.autocast()


def lm_logits(model: GPT, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits from hidden states: the LM head runs outside autocast (see the module docstring)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return model.logits_from_hidden(hidden.float())


# --------------------------------------------------------------------------- sampling rules


def adjust_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits -> logits whose softmax is the sampling distribution (removed tokens = -inf).

    ``repetition_penalty`` (CTRL, arXiv:1909.05858) divides positive logits and
    multiplies negative ones of every token in ``seen`` (B, V), so > 1 makes
    repeats less likely. ``frequency_penalty`` and ``presence_penalty`` are
    OpenAI's: ``counts`` (B, V) holds how often each token was already generated
    (the prompt does not count, so copying from it is not penalised), and a token's
    logit drops by ``frequency_penalty * count + presence_penalty * (count > 0)``.
    ``top_p`` keeps the smallest set of most likely tokens
    whose probability reaches ``top_p`` (always at least one). Temperature 0 here
    means no scaling (greedy decoding takes the argmax of the penalised logits).
    """
    rows = SamplingRows.build([(temperature or 1.0, top_k, top_p, repetition_penalty, frequency_penalty,
                                presence_penalty)] * logits.size(0), logits.device)
    return adjust_logits_rows(logits, rows, seen, counts)


@dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling settings of a batch as (B,) tensors, for one vectorised draw.

    Greedy rows (temperature 0) have divisor 1 and no top-k/top-p. The ``any_*``
    flags (python bools) let a batch skip the rules none of its rows uses.
    """

    greedy: torch.Tensor  # bool
    divisor: torch.Tensor  # float: the temperature, 1 for greedy rows
    top_k: torch.Tensor  # long: 0 = off
    top_p: torch.Tensor  # float: 1 = off
    penalty: torch.Tensor  # float: 1 = off
    frequency: torch.Tensor  # float: 0 = off
    presence: torch.Tensor  # float: 0 = off
    all_greedy: bool
    any_scaled: bool
    max_top_k: int  # 0 = no row uses top-k
    any_top_p: bool
    any_penalty: bool
    any_counted: bool  # some row has a frequency or presence penalty

    @classmethod
    def build(cls, settings: Sequence[tuple[Any, ...]], device: torch.device | str) -> SamplingRows:
        """From one ``(temperature, top_k, top_p, repetition_penalty[, frequency_penalty, presence_penalty])``
        per row (values already checked; the last two default to 0)."""
        settings = [(*s, 0.0, 0.0)[:6] for s in settings]
        greedy = [s[0] == 0 for s in settings]
        divisor = [1.0 if g else float(s[0]) for g, s in zip(greedy, settings)]
        top_k = [0 if g or s[1] is None else int(s[1]) for g, s in zip(greedy, settings)]
        top_p = [1.0 if g or s[2] is None else float(s[2]) for g, s in zip(greedy, settings)]
        penalty = [float(s[3]) for s in settings]
        frequency = [float(s[4]) for s in settings]
        presence = [float(s[5]) for s in settings]
        return cls(
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            divisor=torch.tensor(divisor, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            penalty=torch.tensor(penalty, dtype=torch.float32, device=device),
            frequency=torch.tensor(frequency, dtype=torch.float32, device=device),
            presence=torch.tensor(presence, dtype=torch.float32, device=device),
            all_greedy=all(greedy),
            any_scaled=any(d != 1.0 for d in divisor),
            max_top_k=max(top_k, default=0),
            any_top_p=any(p < 1.0 for p in top_p),
            any_penalty=any(r != 1.0 for r in penalty),
            any_counted=any(f != 0.0 for f in frequency) or any(p != 0.0 for p in presence),
        )


def adjust_logits_rows(logits: torch.Tensor, rows: SamplingRows, seen: torch.Tensor | None = None,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """``adjust_logits`` with each row's own settings; a row's result does not depend on the others."""
    logits = logits.float()
    if rows.any_penalty and seen is not None:
        rp = rows.penalty[:, None]
        penalised = torch.where(logits > 0, logits / rp, logits * rp)  # rp = 1 leaves a row bit-identical
        logits = torch.where(seen, penalised, logits)
    if rows.any_counted and counts is not None:  # OpenAI's order (as vLLM): after the repetition penalty
        logits = logits - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)
    if rows.any_scaled:
        logits = logits / rows.divisor[:, None]
    vocab = logits.size(-1)
    if rows.max_top_k > 0:
        k = min(rows.max_top_k, vocab)
        top = torch.topk(logits, k, dim=-1).values  # descending, so a row's k-th largest is top[k-1]
        kth = top.gather(-1, (rows.top_k.clamp(1, k) - 1)[:, None])
        on = (rows.top_k > 0) & (rows.top_k < vocab)
        kth = torch.where(on[:, None], kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if rows.any_top_p:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (rows with top_p 1 drop nothing).
        drop_sorted = ((probs.cumsum(dim=-1) - probs) >= rows.top_p[:, None]) & (rows.top_p < 1.0)[:, None]
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_rows(adjusted: torch.Tensor, rows: SamplingRows, uniforms: torch.Tensor | None
                ) -> torch.Tensor:
    """(B,) tokens from adjusted (B, V) logits: argmax for greedy rows, inverse-CDF draws for the others.

    ``uniforms`` (B,) in [0, 1) is one number per row (ignored for greedy rows; may be
    None when every row is greedy). The token is the first whose cumulative
    probability exceeds u * total, so removed tokens (probability 0) are never drawn.
    """
    best = adjusted.argmax(dim=-1)
    if rows.all_greedy:
        return best
    if uniforms is None:
        raise ChatforgeError("sample_rows: sampled rows need one uniform number each")
    cdf = adjusted.softmax(dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total can round up to total: stay strictly below it so a token is always found.
    target = torch.minimum(uniforms.to(cdf)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=adjusted.size(-1) - 1)
    return torch.where(rows.greedy, best, drawn)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits; temperature 0 is argmax (after the penalty).

    ``generator`` is a CPU generator for the one uniform number drawn per row (None:
    torch's global generator).
    """
    rows = SamplingRows.build([(temperature, top_k, top_p, repetition_penalty, frequency_penalty,
                                presence_penalty)] * logits.size(0), logits.device)
    adjusted = adjust_logits_rows(logits, rows, seen, counts)
    uniforms = None if rows.all_greedy else torch.rand(logits.size(0), generator=generator)
    return sample_rows(adjusted, rows, uniforms)


def token_logprobs(adjusted: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) log-probability of each row's token under softmax(adjusted)."""
    return torch.log_softmax(adjusted, dim=-1).gather(-1, tokens[:, None])[:, 0]


# --------------------------------------------------------------------------- checks


def _check_settings(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, repetition_penalty: float,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> None:
    if not prompts:
        raise ChatforgeError("generate: no prompts given")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ChatforgeError(f"generate: prompt {i} is empty; give at least one token (e.g. BOS)")
        bad = [t for t in p if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ChatforgeError(f"generate: prompt {i} has invalid token ids (not integers in [0, {vocab})): {bad[:5]}")
    if max_new_tokens < 0:
        raise ChatforgeError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise ChatforgeError(
            f"generate: prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
            f"exceeds the model's context block_size={model.config.block_size}; shorten the prompt or "
            f"lower max_new_tokens"
        )
    if temperature < 0:
        raise ChatforgeError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ChatforgeError(f"generate: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ChatforgeError(f"generate: top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty <= 0:
        raise ChatforgeError(f"generate: repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not -2.0 <= value <= 2.0:  # OpenAI's range
            raise ChatforgeError(f"generate: {name} must be in [-2, 2] (0 = off), got {value}")


@dataclass
class _Job:
    """A checked generation request: everything ``_steps`` needs."""

    model: GPT
    prompts: list[list[int]]
    max_new_tokens: int
    rows: SamplingRows
    stops: set[int]
    seed: int | None
    device: torch.device
    precision: Precision
    compile: bool = False  # decode steps through ``compiled_decode`` (the prefill stays eager)


def _prepare(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, repetition_penalty: float, stop_tokens: Iterable[int], seed: int | None,
             device: torch.device | str | None, dtype: str, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, compile: bool = False) -> _Job:
    """Check everything now, so bad input fails at the call, not at the first token."""
    _check_settings(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                    frequency_penalty, presence_penalty)
    model_device = next(model.parameters()).device
    wanted = torch.device(device) if device is not None else model_device
    if wanted.type != model_device.type or (wanted.index is not None and wanted != model_device):
        raise ChatforgeError(f"generate: device {wanted} differs from the model's device {model_device}; "
                             f"move the model with model.to({str(wanted)!r}) first")
    rows = SamplingRows.build([(temperature, top_k, top_p, repetition_penalty, frequency_penalty,
                                presence_penalty)] * len(prompts), model_device)
    if compile and (why := can_compile(model)) is not None:
        log.warning("generate: compile=True ignored: %s", why)
        compile = False
    return _Job(model, prompts, max_new_tokens, rows, set(stop_tokens), seed, model_device,
                model_precision(model, dtype, model_device), bool(compile))


# --------------------------------------------------------------------------- the decode loop


def _steps(job: _Job, want_logprobs: bool) -> Iterator[tuple[list[int | None], list[float] | None]]:
    """Yield, per step, each row's new token (a stop token once, then None) and, if wanted, its logprob.

    The caller runs it under ``torch.no_grad()`` and the job's autocast (see the module docstring).
    """
    model, prompts, device, rows = job.model, job.prompts, job.device, job.rows
    B, T0 = len(prompts), max(len(p) for p in prompts)
    if job.max_new_tokens == 0:
        return

    idx = torch.zeros(B, T0, dtype=torch.long, device=device)
    padding = torch.zeros(B, T0, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):  # left padding: every row's last prompt token is column T0-1
        idx[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        padding[b, T0 - len(p):] = True
    seen = None
    if rows.any_penalty:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, dtype=torch.long, device=device)] = True
    counts = torch.zeros(B, model.config.vocab_size, device=device) if rows.any_counted else None
    generator = None
    if job.seed is not None:
        generator = torch.Generator()  # CPU: the same draws whatever the model's device
        generator.manual_seed(job.seed)

    was_training = model.training
    model.eval()
    try:
        need = T0 + job.max_new_tokens
        cache = KVCache.for_model(model, B, bucket_len(need, model.config.block_size) if job.compile else need)
        hidden = model.forward_hidden(idx, kv_cache=cache, padding_mask=padding)
        logits = lm_logits(model, hidden[:, -1])
        compiled = CompiledDecode(model, cache) if job.compile and job.max_new_tokens > 1 else None
        finished = [False] * B
        for step in range(job.max_new_tokens):
            adjusted = adjust_logits_rows(logits, rows, seen, counts)
            uniforms = None if rows.all_greedy else torch.rand(B, generator=generator)
            nxt = sample_rows(adjusted, rows, uniforms)
            lps = token_logprobs(adjusted, nxt).tolist() if want_logprobs else None
            out: list[int | None] = []
            for b, tok in enumerate(nxt.tolist()):
                out.append(None if finished[b] else tok)
                if tok in job.stops:
                    finished[b] = True
            yield out, lps
            if all(finished) or step == job.max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            if counts is not None:
                counts[torch.arange(B, device=device), nxt] += 1
            if compiled is not None:
                logits = compiled.step(nxt)
            else:
                hidden = model.forward_hidden(nxt[:, None], kv_cache=cache)
                logits = lm_logits(model, hidden[:, -1])
    finally:
        model.train(was_training)


def _run(job: _Job, want_logprobs: bool) -> list[Generation]:
    """Decode the whole batch: one no_grad + autocast region around all steps."""
    gens = [Generation([], "length") for _ in job.prompts]
    with torch.no_grad(), forward_autocast(job.precision):
        for tokens, lps in _steps(job, want_logprobs):
            for b, tok in enumerate(tokens):
                if tok is None:
                    continue
                g = gens[b]
                g.tokens.append(tok)
                if lps is not None:
                    g.logprobs.append(lps[b])
                if tok in job.stops:
                    g.finish_reason = "stop"
    return gens


def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens.

    Each row stops at its first stop token (excluded from its output; see
    ``generate_details`` for the stop token, finish reason and log-probabilities).
    Rows are decoded together in one batch; with ``seed`` the result is
    reproducible for the same batch (a different batch composition draws
    different random numbers). ``compile=True`` runs the decode steps through a compiled graph
    (``compiled_decode``: the same tokens up to float rounding, about twice as fast per step on a CPU
    once compiled; the first call per batch size and length bucket compiles, about 10 s for a small model on
    2 CPU cores).
    """
    job = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                   seed, device, dtype, frequency_penalty, presence_penalty, compile)
    return [g.content_tokens for g in _run(job, want_logprobs=False)]


def generate_details(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    compile: bool = False,
) -> list[Generation]:
    """Like ``generate`` (same arguments, same tokens), but one ``Generation`` per prompt:
    tokens including the stop token, finish reason, and each token's log-probability."""
    job = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                   seed, device, dtype, frequency_penalty, presence_penalty, compile)
    return _run(job, want_logprobs=True)


# --------------------------------------------------------------------------- streaming


class TokenStream(Iterator[int]):
    """The tokens of one prompt as they are produced (the stop token is not yielded).

    Once exhausted, ``finish_reason`` is "stop" or "length" and ``result`` the whole
    ``Generation`` (stop token and log-probabilities included).

    The decode runs in a helper thread, one step per ``next`` (nothing is decoded
    ahead): autocast and grad mode are per thread, so the decode keeps one autocast
    region (and its cached bf16 weights) for the whole reply while the caller's
    code between tokens runs in its own mode. ``close()``, or dropping the stream,
    ends the helper after its current step.
    """

    def __init__(self, job: _Job) -> None:
        self.finish_reason: str | None = None
        self.result: Generation | None = None
        self._gen = Generation([], "length")
        self._stops = job.stops
        self._ask: queue.Queue[bool] = queue.Queue()
        self._answer: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._done = False
        # The helper gets the queues, not self: a dropped stream can then be collected (and close itself).
        self._thread = threading.Thread(target=_stream_worker, args=(job, self._ask, self._answer),
                                        name="chatforge-stream", daemon=True)
        self._thread.start()

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        self._ask.put(True)
        kind, value = self._answer.get()
        if kind == "error":  # the decode failed: no finish reason, the error goes to the caller
            self.close()
            raise value
        if kind == "end":
            self._end("length")
            raise StopIteration
        (tok,), (lp,) = value
        self._gen.tokens.append(tok)
        self._gen.logprobs.append(lp)
        if tok in self._stops:
            self._end("stop")
            raise StopIteration
        return tok

    def _end(self, reason: str) -> None:
        self._gen.finish_reason = reason
        self.finish_reason, self.result = reason, self._gen
        self.close()

    def close(self) -> None:
        """Stop decoding and wait for the helper thread to end (after its current step; it restores the
        model's mode). Waiting matters: a helper still inside torch when the interpreter exits aborts the
        process ("terminate called without an active exception")."""
        if not self._done:
            self._done = True
            self._ask.put(False)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:
        self.close()


def _stream_worker(job: _Job, ask: queue.Queue[bool], answer: queue.Queue[tuple[str, Any]]) -> None:
    """The helper thread of a ``TokenStream``: one decode step per True on ``ask``, until False."""
    try:
        with torch.no_grad(), forward_autocast(job.precision):
            steps = _steps(job, want_logprobs=True)
            try:
                while ask.get():
                    step = next(steps, None)
                    if step is None:
                        break
                    answer.put(("step", step))
            finally:
                steps.close()  # runs _steps' cleanup (the model's train/eval mode) here, in this thread
    except BaseException as e:  # handed to the consumer, raised there
        answer.put(("error", e))
        return
    answer.put(("end", None))


def stream(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    compile: bool = False,
) -> TokenStream:
    """Yield the new tokens of one prompt as they are produced (same rules and tokens as ``generate``).

    Bad arguments raise here, at the call, not at the first ``next``.
    """
    return TokenStream(_prepare(model, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                stop_tokens, seed, device, dtype, frequency_penalty, presence_penalty, compile))
