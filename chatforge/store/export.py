"""Turning collected feedback into training data (JSONL, one file per kind).

- ``preferences.jsonl``: ``{"prompt": [messages], "chosen": [assistant], "rejected":
  [assistant], "meta"}`` in TRL's conversational preference format, for reward
  models and DPO. A ranking of K responses gives every implied pair (each response
  beats every one ranked below it: K(K-1)/2 pairs); in chat, a thumbs-up and a
  thumbs-down answer to the same user message (a regenerated sibling) give a pair.
- ``sft.jsonl``: ``{"messages": [...], "meta"}`` (the format ``chatforge finetune sft``
  reads) from responses whose mean rating over every aspect and rater reaches
  ``min_rating``, and from thumbed-up chat answers.
- ``labels.jsonl``: ``{"text", "label", "meta"}``, one row per submitted label (a
  single-field schema's label is that field's value, else the whole value object).
- ``ratings.jsonl``: one row per rating with the prompt, the response and every aspect.
- ``moderation.jsonl`` (asked for by name, not in the default kinds): ``{"text", "label",
  "place", "source": "review"}``, one row per reviewed safety flag, the format the
  moderation classifier trains on: the flagged text (the user's message for a prompt
  flag, the answer as generated for an answer flag) labelled with the category the
  reviewer confirmed, or ``safe`` when they cleared it. Pending flags are not exported.

Except in ``moderation.jsonl``, ``meta`` says where a row came from (source, user, timestamps, model ids), so
a training run can filter or weight by it. Everything is read in one snapshot and
every file is written atomically (temp file + rename): a crash leaves the previous
export intact, never a half-written file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from chatforge.io import write_jsonl
from chatforge.store.constants import ALL_EXPORT_KINDS, EXPORT_KINDS
from chatforge.store.db import Store
from chatforge.store.models import (
    RATING_ASPECTS,
    Conversation,
    Dataset,
    Item,
    Label,
    LabelSchema,
    Message,
    MessageFeedback,
    Prompt,
    Ranking,
    Rating,
    Response,
    SafetyFlag,
    User,
)
from chatforge.store.service import Invalid, flag_text


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


class _Threads:
    """Rebuilds the messages leading to a chat message by following ``parent_id`` links
    (so a regenerated sibling's alternative is never part of the history)."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self._convs: dict[int, tuple[Conversation, dict[int, Message]]] = {}

    def _load(self, conv_id: int) -> tuple[Conversation, dict[int, Message]]:
        if conv_id not in self._convs:
            conv = self.s.get(Conversation, conv_id)
            msgs = {m.id: m for m in self.s.scalars(select(Message).where(Message.conversation_id == conv_id))}
            self._convs[conv_id] = (conv, msgs)
        return self._convs[conv_id]

    def upto(self, conv_id: int, message_id: int | None) -> list[dict[str, str]]:
        """The conversation from its system message down to ``message_id`` (inclusive)."""
        conv, msgs = self._load(conv_id)
        chain: list[Message] = []
        seen: set[int] = set()
        while message_id is not None and message_id in msgs and message_id not in seen:
            seen.add(message_id)
            chain.append(msgs[message_id])
            message_id = msgs[message_id].parent_id
        chain.reverse()
        out = [{"role": "system", "content": conv.system}] if conv.system else []
        return out + [{"role": m.role, "content": m.content} for m in chain]


def _usernames(s: Session) -> dict[int, str]:
    return dict(s.execute(select(User.id, User.username)).all())


def _dataset_names(s: Session) -> dict[int, str]:
    return dict(s.execute(select(Dataset.id, Dataset.name)).all())


def _thumbs(s: Session) -> list[tuple[MessageFeedback, Message]]:
    return list(s.execute(
        select(MessageFeedback, Message).join(Message, Message.id == MessageFeedback.message_id)
        .where(MessageFeedback.thumb != 0, Message.role == "assistant").order_by(MessageFeedback.id)))


# --------------------------------------------------------------------------- preferences


def _ranking_pairs(s: Session) -> Iterator[dict[str, Any]]:
    users, datasets = _usernames(s), _dataset_names(s)
    responses = {r.id: r for r in s.scalars(select(Response).where(
        Response.prompt_id.in_(select(Ranking.prompt_id))))}
    rows = s.execute(select(Ranking, Prompt).join(Prompt, Prompt.id == Ranking.prompt_id).order_by(Ranking.id))
    for rk, prompt in rows:
        order = [responses[i] for i in rk.order if i in responses]  # a response deleted since is skipped
        for i, chosen in enumerate(order):
            for j in range(i + 1, len(order)):
                rejected = order[j]
                yield {
                    "prompt": prompt.messages,
                    "chosen": _assistant(chosen.text),
                    "rejected": _assistant(rejected.text),
                    "meta": {
                        "source": "ranking", "user": users.get(rk.user_id), "created_at": _iso(rk.created_at),
                        "chosen_model": chosen.model_id, "rejected_model": rejected.model_id,
                        "chosen_model_version": chosen.model_version,
                        "rejected_model_version": rejected.model_version,
                        "chosen_rank": i + 1, "rejected_rank": j + 1, "n_ranked": len(order),
                        "dataset": datasets.get(prompt.dataset_id), "prompt_id": prompt.id, "ranking_id": rk.id,
                        "chosen_response_id": chosen.id, "rejected_response_id": rejected.id,
                    },
                }


def _thumb_pairs(s: Session) -> Iterator[dict[str, Any]]:
    users, threads = _usernames(s), _Threads(s)
    groups: dict[tuple[int, int, int | None], dict[int, list[tuple[MessageFeedback, Message]]]] = defaultdict(
        lambda: {1: [], -1: []})
    for fb, msg in _thumbs(s):
        groups[(fb.user_id, msg.conversation_id, msg.parent_id)][fb.thumb].append((fb, msg))
    for (user_id, conv_id, parent_id), by_thumb in groups.items():
        if not by_thumb[1] or not by_thumb[-1]:
            continue
        prompt = threads.upto(conv_id, parent_id)
        for up_fb, up in by_thumb[1]:
            for down_fb, down in by_thumb[-1]:
                yield {
                    "prompt": prompt,
                    "chosen": _assistant(up.content),
                    "rejected": _assistant(down.content),
                    "meta": {
                        "source": "thumbs", "user": users.get(user_id),
                        "created_at": _iso(max(up_fb.updated_at, down_fb.updated_at)),
                        "chosen_model": up.model_id, "rejected_model": down.model_id,
                        "chosen_model_version": up.model_version, "rejected_model_version": down.model_version,
                        "conversation_id": conv_id, "chosen_message_id": up.id, "rejected_message_id": down.id,
                        "chosen_comment": up_fb.comment, "rejected_comment": down_fb.comment,
                    },
                }


def _preferences(s: Session, min_rating: float) -> Iterator[dict[str, Any]]:
    yield from _ranking_pairs(s)
    yield from _thumb_pairs(s)


# --------------------------------------------------------------------------- sft


def _sft(s: Session, min_rating: float) -> Iterator[dict[str, Any]]:
    users, datasets, threads = _usernames(s), _dataset_names(s), _Threads(s)
    per_rating = sum(getattr(Rating, a) for a in RATING_ASPECTS) / float(len(RATING_ASPECTS))
    stats = (select(Rating.response_id, func.avg(per_rating).label("mean"), func.count().label("n"))
             .group_by(Rating.response_id).subquery())
    rows = s.execute(select(Response, Prompt, stats.c.mean, stats.c.n)
                     .join(stats, stats.c.response_id == Response.id).join(Prompt, Prompt.id == Response.prompt_id)
                     .where(stats.c.mean >= min_rating).order_by(Response.id))
    for resp, prompt, mean, n in rows:
        yield {
            "messages": [*prompt.messages, *_assistant(resp.text)],
            "meta": {"source": "ratings", "mean_rating": round(float(mean), 4), "n_ratings": int(n),
                     "model": resp.model_id, "model_version": resp.model_version,
                     "dataset": datasets.get(prompt.dataset_id), "prompt_id": prompt.id, "response_id": resp.id,
                     "created_at": _iso(resp.created_at)},
        }
    for fb, msg in _thumbs(s):
        if fb.thumb != 1:
            continue
        yield {
            "messages": threads.upto(msg.conversation_id, msg.id),
            "meta": {"source": "thumbs", "user": users.get(fb.user_id), "model": msg.model_id,
                     "model_version": msg.model_version, "conversation_id": msg.conversation_id,
                     "message_id": msg.id, "comment": fb.comment, "created_at": _iso(fb.updated_at)},
        }


# --------------------------------------------------------------------------- labels, ratings


def _labels(s: Session, min_rating: float) -> Iterator[dict[str, Any]]:
    users, datasets = _usernames(s), _dataset_names(s)
    rows = s.execute(select(Label, Item, LabelSchema).join(Item, Item.id == Label.item_id)
                     .join(LabelSchema, LabelSchema.id == Label.schema_id).order_by(Label.id))
    for lb, item, schema in rows:
        fields = [f["name"] for f in schema.fields]
        label = lb.value.get(fields[0]) if len(fields) == 1 else lb.value
        yield {"text": item.text, "label": label,
               "meta": {"user": users.get(lb.user_id), "schema": schema.name, "dataset": datasets.get(item.dataset_id),
                        "item_id": item.id, "item_meta": item.meta, "created_at": _iso(lb.created_at)}}


def _ratings(s: Session, min_rating: float) -> Iterator[dict[str, Any]]:
    users, datasets = _usernames(s), _dataset_names(s)
    rows = s.execute(select(Rating, Response, Prompt).join(Response, Response.id == Rating.response_id)
                     .join(Prompt, Prompt.id == Response.prompt_id).order_by(Rating.id))
    for rt, resp, prompt in rows:
        yield {"prompt": prompt.messages, "response": resp.text,
               **{a: getattr(rt, a) for a in RATING_ASPECTS}, "comment": rt.comment,
               "meta": {"user": users.get(rt.user_id), "model": resp.model_id, "model_version": resp.model_version,
                        "dataset": datasets.get(prompt.dataset_id), "prompt_id": prompt.id, "response_id": resp.id,
                        "created_at": _iso(rt.created_at)}}


def _moderation(s: Session, min_rating: float) -> Iterator[dict[str, Any]]:
    rows = s.scalars(select(SafetyFlag).where(SafetyFlag.status != "pending").order_by(SafetyFlag.id))
    for f in rows:
        text = flag_text(f.place, f.prompt, f.answer_generated)
        if not text.strip():
            continue
        label = (f.reviewer_category or f.category) if f.status == "confirmed" else "safe"
        yield {"text": text, "label": label, "place": f.place, "source": "review"}


_BUILDERS = {"preferences": _preferences, "sft": _sft, "labels": _labels, "ratings": _ratings,
             "moderation": _moderation}


def export_feedback(store: Store, out_dir: Path, kinds: Sequence[str] = EXPORT_KINDS,
                    min_rating: float = 4.0) -> dict[str, int]:
    """Write ``<kind>.jsonl`` under ``out_dir`` for each of ``kinds`` (any of ``ALL_EXPORT_KINDS``; the
    default is the chat model's training data, ``EXPORT_KINDS``); returns rows per kind."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    unknown = [k for k in kinds if k not in ALL_EXPORT_KINDS]
    if unknown or not kinds:
        raise Invalid("kinds", f"unknown export kind {unknown[0]!r}; choose from {', '.join(ALL_EXPORT_KINDS)}"
                      if unknown else f"choose at least one of {', '.join(ALL_EXPORT_KINDS)}")
    if isinstance(min_rating, bool) or not isinstance(min_rating, int | float) or not 1 <= min_rating <= 5:
        raise Invalid("min_rating", f"must be a number from 1 to 5, got {min_rating!r}")
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    with store.session(write=False) as s:  # one snapshot, so the files agree with each other
        for kind in dict.fromkeys(kinds):
            counts[kind] = write_jsonl(out_dir / f"{kind}.jsonl", _BUILDERS[kind](s, float(min_rating)))
    return counts
