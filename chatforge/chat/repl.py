"""``chatforge chat``: a multi-turn terminal chat that streams the model's reply.

Commands: ``/reset`` forgets the conversation (keeps the system message),
``/system TEXT`` sets the system message and resets, ``/quit`` (or end of input)
leaves. The conversation is rendered with the same template the model was
fine-tuned with; when it grows past the context, the oldest turns are dropped
(the system message is kept) and a note says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from chatforge.chat.template import render, stop_token_ids
from chatforge.model.generate import stream
from chatforge.model.gpt import GPT

HELP = "commands: /reset  /system TEXT  /quit"


@dataclass
class Sampling:
    temperature: float = 0.7
    top_k: int | None = 50
    top_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: generated tokens only (the CLI's default is 0.5)
    presence_penalty: float = 0.0
    max_new_tokens: int = 200
    seed: int | None = None


def stream_reply(model: GPT, tok: Any, messages: list[dict[str, str]], sampling: Sampling,
                 device: Any = None) -> tuple[Iterator[str], int]:
    """Text pieces of the reply as they are produced, and how many old turns were dropped to fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    budget = model.config.block_size - sampling.max_new_tokens
    ids = render(system + turns, tok, add_generation_prompt=True).ids
    while len(ids) > budget and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop the oldest user/assistant pair
        dropped += 1
        ids = render(system + turns, tok, add_generation_prompt=True).ids
    if len(ids) > budget:
        ids = ids[:1] + ids[-(budget - 1):]  # a single very long message: keep its end

    tokens = stream(model, ids, sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                    frequency_penalty=sampling.frequency_penalty, presence_penalty=sampling.presence_penalty,
                    stop_tokens=stop_token_ids(tok), seed=sampling.seed, device=device)

    def pieces() -> Iterator[str]:
        pending: list[int] = []
        for t in tokens:
            pending.append(t)
            text = tok.decode(pending)
            if not text.endswith("\ufffd"):  # a multi-byte character may still be incomplete
                yield text
                pending = []
        if pending:
            yield tok.decode(pending)

    return pieces(), dropped


def chat_loop(model: GPT, tok: Any, sampling: Sampling, read: Callable[[str], str] = input,
              out: TextIO | None = None, system: str = "", device: Any = None) -> list[dict[str, str]]:
    """Run the chat until ``/quit`` or end of input; returns the final conversation."""
    import sys

    out = out or sys.stdout
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return messages
        if text == "/reset":
            messages = list(base)
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip()
            base = [{"role": "system", "content": system}] if system else []
            messages = list(base)
            out.write(f"(system message {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]!r}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        pieces, dropped = stream_reply(model, tok, messages, sampling, device)
        if dropped:
            out.write(f"(context full: the oldest {dropped} exchange(s) are no longer seen by the model)\n")
        out.write("assistant> ")
        reply = []
        for piece in pieces:
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
