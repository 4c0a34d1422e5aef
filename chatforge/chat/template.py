"""The chat format: conversations <-> token ids, with the loss mask for fine-tuning.

A conversation is a list of messages ``{"role": ..., "content": str}`` (the HF/TRL
``messages`` format). It renders as

    <|bos|> <|role|> encode(content) <|end|> <|role|> encode(content) <|end|> ...

one turn per message, each opened by its role's special token and closed by
``<|end|>``. Roles:

    system       instructions; only as the first message
    user         the person
    assistant    the model's reply                                   (learned)
    tool_call    a tool call the model writes, e.g. JSON              (learned)
    tool_result  what the tool returned; only right after a tool_call or another tool_result

``loss_mask[i]`` is 1 where token ``ids[i]`` is learned: the content tokens of the
model's own turns (assistant, tool_call) and their closing ``<|end|>``, so the
model learns to end its turn (TRL's assistant-only loss). Everything else (BOS,
role tokens, system/user/tool_result text) is context only. For inference the
prompt ends with ``<|assistant|>`` (``add_generation_prompt``) and generation
stops at ``<|end|>`` (``stop_token_ids``).

Special tokens only ever come from the template: ``encode`` never produces them,
so a user who types ``<|assistant|>`` gets those characters as ordinary text and
cannot forge a turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatforge.errors import DataError
from chatforge.tokenizer.base import Tokenizer

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool_call", "tool_result")
# The turns the model itself writes: their content and closing <|end|> are learned.
LEARNED_ROLES: frozenset[str] = frozenset({"assistant", "tool_call"})


def role_token(role: str) -> str:
    """The special token that opens a turn of ``role``, e.g. ``<|user|>``."""
    return f"<|{role}|>"


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: token ids and, per token, 1 if it is learned."""

    ids: list[int]
    loss_mask: list[int]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise DataError(f"RenderedChat: {len(self.ids)} ids but {len(self.loss_mask)} loss_mask entries")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_learned(self) -> int:
        return sum(self.loss_mask)


# --------------------------------------------------------------------------- validation


def validate_messages(messages: Any, where: str = "conversation", require_assistant: bool = False) -> None:
    """Raise ``DataError`` naming ``where`` (e.g. ``data.jsonl:12``), the message and the field
    if ``messages`` is not a valid conversation. Keys other than role/content are ignored."""
    if not isinstance(messages, list | tuple):
        raise DataError(f"{where}: messages must be a list of {{\"role\", \"content\"}} objects, "
                        f"got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: messages is empty: a conversation needs at least one message")
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with \"role\" and \"content\", got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{at}: missing field {key!r} (keys: {', '.join(map(str, m)) or 'none'})")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"{at}: field 'role': {role!r} is not a known role; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            got = "null" if content is None else type(content).__name__
            raise DataError(f"{at}: field 'content' must be a string, got {got}")
        if role == "system" and i != 0:
            raise DataError(f"{at}: field 'role': a system message may only be the first message")
        if role == "tool_result" and (i == 0 or messages[i - 1]["role"] not in ("tool_call", "tool_result")):
            raise DataError(f"{at}: field 'role': a tool_result must follow a tool_call (or another tool_result)")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message: there is nothing to learn from this conversation "
                        "(training needs at least one message with role 'assistant')")


# --------------------------------------------------------------------------- rendering


def render(
    messages: Sequence[dict[str, Any]],
    tok: Tokenizer,
    add_generation_prompt: bool = False,
    require_assistant: bool = False,
    where: str = "conversation",
) -> RenderedChat:
    """Render ``messages`` into ids and loss mask (format in the module docstring).

    ``add_generation_prompt`` appends ``<|assistant|>`` (mask 0) so the model writes the
    next reply. ``require_assistant`` (training) rejects conversations with no
    assistant message. Errors name ``where``.
    """
    validate_messages(messages, where, require_assistant)
    end = tok.end_id
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        learned = int(m["role"] in LEARNED_ROLES)
        content = tok.encode(m["content"])
        ids.append(tok.special_id(role_token(m["role"])))
        ids.extend(content)
        ids.append(end)
        mask.append(0)
        mask.extend([learned] * (len(content) + 1))  # the content and its <|end|>
    if add_generation_prompt:
        ids.append(tok.special_id(role_token("assistant")))
        mask.append(0)
    return RenderedChat(ids, mask)


def prompt_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages a model sees before writing the last assistant turn.

    If the conversation ends with an assistant message (an evaluation example and
    its reference reply) that message is dropped; otherwise (a conversation waiting
    for a reply) every message is kept.
    """
    msgs = list(messages)
    if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return msgs


def render_prompt(messages: Sequence[dict[str, Any]], tok: Tokenizer, where: str = "conversation") -> list[int]:
    """Ids to generate the last assistant turn from: ``prompt_messages(messages)``
    rendered, then ``<|assistant|>``. Generate until one of ``stop_token_ids(tok)``."""
    msgs = prompt_messages(messages)
    if not msgs:
        raise DataError(f"{where}: nothing to prompt with: the only message is the assistant reply")
    return render(msgs, tok, add_generation_prompt=True, where=where).ids


def stop_token_ids(tok: Tokenizer) -> list[int]:
    """Token ids that end a generated reply: ``<|end|>`` first (the one the model is trained
    to write), then every other special token, which never belongs inside a reply (a
    model that skips ``<|end|>`` and opens a new turn is stopped there)."""
    specials = list(tok.special_tokens.values())
    return [tok.end_id, *(i for i in specials if i != tok.end_id)]


def parse_assistant(ids: Sequence[int], tok: Tokenizer) -> str:
    """The text of a generated reply: ``ids`` decoded up to the first stop token
    (``<|end|>`` or any other special token), which is not included."""
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
        ids = ids.tolist()
    ids = list(ids)
    cut = next((k for k, i in enumerate(ids) if tok.is_special(i)), len(ids))
    return tok.decode(ids[:cut])


def messages_from_ids(ids: Sequence[int], tok: Tokenizer) -> list[dict[str, str]]:
    """Parse rendered ids back into messages (the inverse of ``render``).

    Accepts ``<|bos|>`` followed by closed turns; a trailing bare ``<|assistant|>``
    (a generation prompt) is ignored. Anything else raises ``DataError`` naming the
    token position.
    """
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    roles = {tok.special_id(role_token(r)): r for r in ROLES}
    if not ids or ids[0] != tok.bos_id:
        raise DataError("chat ids: expected <|bos|> at position 0")
    out: list[dict[str, str]] = []
    pos, n = 1, len(ids)
    while pos < n:
        role = roles.get(ids[pos])
        if role is None:
            raise DataError(f"chat ids: position {pos}: expected a role token ({', '.join(map(role_token, ROLES))}), "
                            f"got {tok.id_to_token(ids[pos])!r}")
        if role == "assistant" and pos == n - 1:
            break  # a generation prompt: the reply is not written yet
        start = pos + 1
        stop = next((k for k in range(start, n) if tok.is_special(ids[k])), n)
        if stop == n or ids[stop] != tok.end_id:
            found = "the end of the ids" if stop == n else repr(tok.id_to_token(ids[stop]))
            raise DataError(f"chat ids: position {pos}: the {role} turn is not closed by <|end|> (found {found})")
        out.append({"role": role, "content": tok.decode(ids[start:stop])})
        pos = stop + 1
    return out
