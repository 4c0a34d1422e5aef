"""Batched KV-cache decoding with temperature, top-k, top-p, repetition penalty and stop tokens.

One prefill runs all prompts at once, left-padded (see ``KVCache``); then each
step feeds one token per row through the cache, so a step costs O(T) attention
instead of re-running the whole sequence. Rows stop independently at a stop
token (which is not returned); the batch ends when every row has stopped or
``max_new_tokens`` were produced. Finished rows keep being fed (their tokens are
discarded) so that the batch stays rectangular.

Sampling order (as in Hugging Face ``generate``): repetition penalty, then
temperature, top-k, top-p, then a draw from a ``torch.Generator`` seeded with
``seed``: the same model, prompts and seed give the same tokens. Temperature 0
is greedy decoding.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator
from itertools import takewhile

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT
from chatforge.model.kv_cache import KVCache

__all__ = ["KVCache", "adjust_logits", "generate", "sample_next_token", "stream"]


def adjust_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits -> logits whose softmax is the sampling distribution (removed tokens = -inf).

    ``repetition_penalty`` (CTRL, arXiv:1909.05858) divides positive logits and
    multiplies negative ones of every token in ``seen`` (B, V), so > 1 makes
    repeats less likely. ``top_p`` keeps the smallest set of most likely tokens
    whose probability reaches ``top_p`` (always at least one).
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits; temperature 0 is argmax (after the penalty)."""
    if temperature == 0:
        return adjust_logits(logits, 1.0, None, None, repetition_penalty, seen).argmax(dim=-1)
    probs = adjust_logits(logits, temperature, top_k, top_p, repetition_penalty, seen).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_settings(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, repetition_penalty: float) -> None:
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


def _decode(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stop_tokens: Iterable[int],
    seed: int | None,
    device: torch.device | str | None,
) -> Iterator[list[int | None]]:
    """Check everything now (so bad input fails at the call, not at the first token),
    then return the generator of steps."""
    _check_settings(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    model_device = next(model.parameters()).device
    wanted = torch.device(device) if device is not None else model_device
    if wanted.type != model_device.type or (wanted.index is not None and wanted != model_device):
        raise ChatforgeError(f"generate: device {wanted} differs from the model's device {model_device}; "
                             f"move the model with model.to({str(wanted)!r}) first")
    return _steps(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                  set(stop_tokens), seed, model_device)


@torch.inference_mode()  # on a generator function: grad mode is switched around each step only
def _steps(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stops: set[int],
    seed: int | None,
    device: torch.device,
) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token, or None for a row that has stopped."""
    B, T0 = len(prompts), max(len(p) for p in prompts)
    if max_new_tokens == 0:
        return

    idx = torch.zeros(B, T0, dtype=torch.long, device=device)
    padding = torch.zeros(B, T0, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):  # left padding: every row's last prompt token is column T0-1
        idx[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
        padding[b, T0 - len(p):] = True
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, dtype=torch.long, device=device)] = True
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, B, T0 + max_new_tokens)
        hidden = model.forward_hidden(idx, kv_cache=cache, padding_mask=padding)
        logits = model.logits_from_hidden(hidden[:, -1])
        finished = [False] * B
        for step in range(max_new_tokens):
            nxt = sample_next_token(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
            out: list[int | None] = []
            for b, tok in enumerate(nxt.tolist()):
                if not finished[b] and tok in stops:
                    finished[b] = True
                out.append(None if finished[b] else tok)
            yield out
            if all(finished) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] = True
            hidden = model.forward_hidden(nxt[:, None], kv_cache=cache)
            logits = model.logits_from_hidden(hidden[:, -1])
    finally:
        model.train(was_training)


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
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens.

    Each row stops at its first stop token (excluded from its output). Rows are
    decoded together in one batch; with ``seed`` the result is reproducible for
    the same batch (a different batch composition draws different random numbers).
    """
    stops = tuple(stop_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                        stops, seed, device):
        for b, tok in enumerate(step):
            if tok is not None:
                outputs[b].append(tok)
    return outputs


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
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (same rules as ``generate``).

    Bad arguments raise here, at the call, not at the first ``next``.
    """
    steps = _decode(model, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                    tuple(stop_tokens), seed, device)
    return (step[0] for step in takewhile(lambda step: step[0] is not None, steps))
