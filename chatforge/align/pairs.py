"""Preference pairs: reading TRL's ``{"prompt", "chosen", "rejected"}`` rows into token ids.

Both forms TRL reads are accepted, one JSONL row each (what ``chatforge feedback export``
and SupportWorld's ``preferences/`` write):

- conversational: ``"prompt"`` a list of messages, ``"chosen"`` / ``"rejected"`` lists
  holding the assistant's answer (one assistant message);
- plain: three strings, the prompt becoming one user turn.

A pair is rendered with the chat template twice, prompt + chosen and prompt + rejected;
what is scored is the answer's tokens after the prompt (its content and ``<|end|>``), the
tokens a chat model writes. Bad rows raise ``DataError`` naming file, line and field;
rows that cannot teach anything are skipped and counted, never silently: identical
answers (no preference), an empty answer, or a prompt that leaves no room in the context.
An answer that does not fit after its prompt is cut at the context and counted.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.chat.template import render, validate_messages
from chatforge.errors import DataError
from chatforge.io import read_jsonl
from chatforge.tokenizer.base import Tokenizer

MIN_ANSWER_TOKENS = 2  # an answer cut to fewer tokens than this after its prompt is skipped


@dataclass(frozen=True)
class Pair:
    """One preference pair as token ids: ``ids[start:]`` is the answer (scored), the rest the prompt."""

    where: str
    chosen: list[int]
    rejected: list[int]
    start: int  # len(prompt ids), the same for both answers


@dataclass
class PairStats:
    rows: int = 0
    pairs: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def summary(self) -> str:
        text = f"{self.pairs} pairs from {self.rows} rows"
        if self.truncated:
            text += f", {self.truncated} with an answer cut at the context"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return text


def _messages(value: Any, where: str, name: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
    if isinstance(value, list):
        return value
    got = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: field {name!r} must be a string or a list of messages, got {got}")


def pair_messages(row: Any, where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(prompt, chosen, rejected)`` message lists of one row, checked."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected', "
                        f"got {type(row).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (keys: {', '.join(map(str, row)) or 'none'})")
    prompt = _messages(row["prompt"], where, "prompt")
    if isinstance(row["prompt"], str) != isinstance(row["chosen"], str) or \
            isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
        raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all be message lists")
    validate_messages(prompt, f"{where}: field 'prompt'")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt' ends with an assistant message; the answer to score goes in "
                        "'chosen' and 'rejected'")
    out = [prompt]
    for key in ("chosen", "rejected"):
        answer = _messages(row[key], where, key)
        if answer:
            validate_messages(answer, f"{where}: field {key!r}")
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            roles = [m["role"] for m in answer]
            raise DataError(f"{where}: field {key!r} must hold exactly one assistant message (the answer), "
                            f"got roles {roles}")
        out.append(answer)
    return out[0], out[1], out[2]


def render_pair(prompt: list[dict[str, Any]], chosen: list[dict[str, Any]], rejected: list[dict[str, Any]],
                tok: Tokenizer, where: str) -> tuple[list[int], list[int], int]:
    """Token ids of prompt + chosen and prompt + rejected, and where the answers start."""
    start = len(render(prompt, tok, add_generation_prompt=True, where=where).ids)
    ids = []
    for answer in (chosen, rejected):
        full = render([*prompt, *answer], tok, where=where).ids
        ids.append(full)
    return ids[0], ids[1], start


def ranking_pairs(row: dict[str, Any], where: str) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                   list[dict[str, Any]], str]]:
    """Every ``(prompt, better, worse, where)`` pair of a K-way ranking row (SupportWorld's ``candidates``
    files): ``{"prompt", "candidates": [{"text", "rank"}, ...]}``, rank 0 the best; equal ranks make no pair."""
    cands = row["candidates"]
    if not isinstance(cands, list) or len(cands) < 2:
        raise DataError(f"{where}: field 'candidates' must list at least 2 answers to rank")
    ranked = []
    for i, c in enumerate(cands):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str) or \
                isinstance(c.get("rank"), bool) or not isinstance(c.get("rank"), int):
            raise DataError(f"{where}: candidates[{i}] must be an object with 'text' (a string) and 'rank' "
                            "(an integer, 0 = best)")
        ranked.append((c["rank"], c["text"]))
    prompt = _messages(row.get("prompt"), where, "prompt")
    validate_messages(prompt, f"{where}: field 'prompt'")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt' ends with an assistant message; the answers go in 'candidates'")
    ranked.sort(key=lambda rt: rt[0])
    out = []
    for i, (ri, better) in enumerate(ranked):
        for rj, worse in ranked[i + 1:]:
            if ri < rj:
                out.append((prompt, [{"role": "assistant", "content": better}],
                            [{"role": "assistant", "content": worse}], f"{where} (rank {ri} > {rj})"))
    return out


def tokenize_pairs(rows: Iterable[tuple[str, Any]], tok: Tokenizer, max_tokens: int) -> tuple[list[Pair], PairStats]:
    """Pairs of ``(where, row)``, each answer cut to ``max_tokens`` in all (context + 1: inputs and targets).
    A ranking row (``candidates``) gives all its pairs."""
    stats = PairStats()
    pairs: list[Pair] = []
    for row_where, row in rows:
        stats.rows += 1
        if isinstance(row, dict) and "candidates" in row and "chosen" not in row:
            expanded = ranking_pairs(row, row_where)
        else:
            expanded = [(*pair_messages(row, row_where), row_where)]
        for prompt, chosen, rejected, where in expanded:
            _add_pair(pairs, stats, prompt, chosen, rejected, tok, max_tokens, where)
    return pairs, stats


def _add_pair(pairs: list[Pair], stats: PairStats, prompt: list[dict[str, Any]], chosen: list[dict[str, Any]],
              rejected: list[dict[str, Any]], tok: Tokenizer, max_tokens: int, where: str) -> None:
    if chosen == rejected:
        stats.skip("with identical chosen and rejected answers")
        return
    if any(not "".join(m["content"] for m in a).strip() for a in (chosen, rejected)):
        stats.skip("with an empty answer")
        return
    c, r, start = render_pair(prompt, chosen, rejected, tok, where)
    if start + MIN_ANSWER_TOKENS > max_tokens:
        stats.skip("whose prompt leaves no room in the context")
        return
    if len(c) > max_tokens or len(r) > max_tokens:
        stats.truncated += 1
        c, r = c[:max_tokens], r[:max_tokens]
    if c == r:  # the answers differed only past the cut
        stats.skip("whose answers are identical within the context")
        return
    pairs.append(Pair(where, c, r, start))
    stats.pairs += 1


def by_prompt(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs grouped by their prompt's token ids, in order of first appearance: a ranking's pairs (or a
    file's rows that share a prompt) stay together, as InstructGPT trains on them."""
    groups: dict[tuple[int, ...], list[Pair]] = {}
    for p in pairs:
        groups.setdefault(tuple(p.chosen[:p.start]), []).append(p)
    return list(groups.values())


def sample_groups(groups: list[list[Pair]], n_pairs: int, seed: int) -> list[list[Pair]]:
    """Whole groups drawn at random (seeded) until they hold at least ``n_pairs`` pairs, in their order;
    all of them when n_pairs is 0 or too large."""
    if n_pairs <= 0 or n_pairs >= sum(len(g) for g in groups):
        return groups
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    keep, total = [], 0
    for i in order:
        if total >= n_pairs:
            break
        keep.append(i)
        total += len(groups[i])
    return [groups[i] for i in sorted(keep)]


def sample_pairs(pairs: list[Pair], n: int, seed: int) -> list[Pair]:
    """``n`` of ``pairs`` drawn at random (seeded), in their order; all of them when n is 0 or too large."""
    if n <= 0 or n >= len(pairs):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def iter_pair_rows(source: str | Path) -> Iterator[tuple[str, Any]]:
    """``(file:line, row)`` of a JSONL preference file."""
    path = Path(source)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: preference pairs are read from .jsonl files (one {{\"prompt\", \"chosen\", "
                        f"\"rejected\"}} object per line)")
    for lineno, row in read_jsonl(path):
        yield f"{path}:{lineno}", row


def load_pairs(source: str | Path, tok: Tokenizer, max_tokens: int) -> tuple[list[Pair], PairStats]:
    """``tokenize_pairs(iter_pair_rows(source), tok, max_tokens)``."""
    return tokenize_pairs(iter_pair_rows(source), tok, max_tokens)
