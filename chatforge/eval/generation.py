"""Greedy answers to chat prompts, for evaluation: the text and whether the model ended its turn.

The same template and stop tokens as ``chatforge chat``. A row stops at a stop token
(``<|end|>`` or any other special token), which ``generate`` does not return, or after
``max_new_tokens`` tokens; so an answer of fewer than ``max_new_tokens`` tokens ended its
turn and one of exactly ``max_new_tokens`` was cut at the length limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chatforge.chat.template import parse_assistant, render_prompt, stop_token_ids
from chatforge.model.generate import generate
from chatforge.model.gpt import GPT

GEN_BATCH = 16


@dataclass(frozen=True)
class Answer:
    text: str
    ended: bool  # stopped on a stop token, not at the length limit
    tokens: int  # new tokens, the stop token not counted


def answer_prompts(model: GPT, tok: Any, conversations: list[tuple[str, list[dict[str, Any]]]],
                   max_new_tokens: int, device: torch.device, batch_size: int = GEN_BATCH) -> list[Answer | None]:
    """Greedy answers to the conversations' last prompts (a trailing assistant message, the reference,
    is left out), in batches; None where the prompt plus ``max_new_tokens`` does not fit the context."""
    stops = stop_token_ids(tok)
    prompts = [render_prompt(msgs, tok, where) for where, msgs in conversations]
    limit = model.config.block_size - max_new_tokens
    answers: list[Answer | None] = [None] * len(prompts)
    fits = [i for i, p in enumerate(prompts) if len(p) <= limit]
    for k in range(0, len(fits), batch_size):
        chunk = fits[k:k + batch_size]
        outs = generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature=0.0, stop_tokens=stops,
                        device=device)
        for i, ids in zip(chunk, outs):
            answers[i] = Answer(parse_assistant(ids, tok), len(ids) < max_new_tokens, len(ids))
    return answers
