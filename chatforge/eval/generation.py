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


MIN_ROOM = 32  # fewest new tokens a prompt must leave room for to be answered
# OpenAI's frequency penalty for greedy answers: it counts generated tokens only (copying the record is
# free) and breaks the one-token loops a small model falls into ("Saltmarsh Saltmarsh ...").
FREQUENCY_PENALTY = 0.5


def answer_prompts(model: GPT, tok: Any, conversations: list[tuple[str, list[dict[str, Any]]]],
                   max_new_tokens: int, device: torch.device, batch_size: int = GEN_BATCH,
                   frequency_penalty: float = FREQUENCY_PENALTY) -> list[Answer | None]:
    """Greedy answers (with ``frequency_penalty``) to the conversations' last prompts (a trailing
    assistant message, the reference, is left out), in batches of similar length. Each answer gets ``max_new_tokens`` or what the context
    leaves after its prompt, whichever is less (an answer cut there has ``ended`` False); None where
    the prompt leaves fewer than ``MIN_ROOM`` tokens."""
    stops = stop_token_ids(tok)
    prompts = [render_prompt(msgs, tok, where) for where, msgs in conversations]
    block = model.config.block_size
    answers: list[Answer | None] = [None] * len(prompts)
    fits = sorted((i for i, p in enumerate(prompts) if block - len(p) >= min(MIN_ROOM, max_new_tokens)),
                  key=lambda i: len(prompts[i]))
    for k in range(0, len(fits), batch_size):
        chunk = fits[k:k + batch_size]
        room = min(max_new_tokens, block - max(len(prompts[i]) for i in chunk))
        outs = generate(model, [prompts[i] for i in chunk], room, temperature=0.0, stop_tokens=stops,
                        device=device, frequency_penalty=frequency_penalty)
        for i, ids in zip(chunk, outs):
            answers[i] = Answer(parse_assistant(ids, tok), len(ids) < room, len(ids))
    return answers
