"""SupportWorld: the built-in data set, a fictional online shop generated from a seed.

``generate(cfg, out_dir)`` writes, with no network and byte-identical output for
a given config:

* ``corpus.jsonl`` — help-centre articles and product pages for pre-training, plus optional shares
  of record notes and support transcripts of training-split customers (``notes.py``);
* ``reviews/`` — sentiment classification (stars -> label), split by product;
* ``conversations/`` — grounded multi-turn support chats, split by customer;
* ``intents/`` — first customer message -> intent, same split as conversations;
* ``candidates/`` — ranked candidate answers per support prompt;
* ``preferences/`` — TRL preference pairs derived from the candidates;
* ``translation/`` — English -> Spanish shop phrases;
* ``safety/`` — moderation examples ``{"text", "label"}`` (``safe`` and the default policy's categories)
  and ``redteam.jsonl``, held-out prompts that must be refused (``safety.py``); refusal conversations
  (intent ``refusal``) are part of ``conversations/`` and their pairs of ``preferences/``;
* ``tags/`` — BIO product-attribute tagging, split by product;
* ``supportworld.json`` — the manifest: config, row counts, label distributions.

Each task directory holds ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``.
Every component draws from its own seeded random stream, so changing the size of
one does not change the others.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chatforge.config import SupportWorldConfig
from chatforge.data.supportworld.answers import INTENTS
from chatforge.data.supportworld.conversations import QUALITY_ORDER, generate_conversations, preference_rows
from chatforge.data.supportworld.corpus import corpus_docs, interleave
from chatforge.data.supportworld.notes import record_notes, support_transcripts
from chatforge.data.supportworld.reviews import generate_reviews
from chatforge.data.supportworld.safety import moderation_rows, redteam_rows, refusal_conversations
from chatforge.data.supportworld.tags import TAGS, generate_tags
from chatforge.data.supportworld.text import rng_for
from chatforge.data.supportworld.translation import generate_translations
from chatforge.data.supportworld.world import SPLITS, make_world
from chatforge.errors import ConfigError
from chatforge.io import write_json, write_jsonl

__all__ = ["VERSION", "TASKS", "generate"]

VERSION = "1.2"  # 1.1: compact system record; every conversation at most MAX_CONVERSATION_CHARS; 1.2: safety data
TASKS = ("reviews", "conversations", "intents", "candidates", "preferences", "translation", "tags", "safety")
LABEL_RULE = "reviews: stars 1-2 negative, 3 neutral, 4-5 positive (stars rate the product, not the delivery)"


def _check(cfg: SupportWorldConfig) -> None:
    for name in ("record_notes", "transcripts"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"supportworld.{name}: {getattr(cfg, name)} must be in [0, 1)")
    if cfg.record_notes + cfg.transcripts >= 1:
        raise ConfigError(f"supportworld.record_notes + supportworld.transcripts = "
                          f"{cfg.record_notes + cfg.transcripts} must be < 1 (the rest is help and product pages)")
    if cfg.corpus_mb <= 0:
        raise ConfigError(f"supportworld.corpus_mb: {cfg.corpus_mb} must be > 0")
    for name in ("n_moderation", "n_redteam"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"supportworld.{name}: {getattr(cfg, name)} must be >= 0")
    if not 0 <= cfg.refusal_share < 1:
        raise ConfigError(f"supportworld.refusal_share: {cfg.refusal_share} must be in [0, 1)")
    for name in ("n_products", "n_customers", "n_reviews", "n_conversations", "n_translations"):
        if getattr(cfg, name) < 10:
            raise ConfigError(f"supportworld.{name}: {getattr(cfg, name)} must be at least 10")
    if not 2 <= cfg.n_candidates <= len(QUALITY_ORDER):
        raise ConfigError(f"supportworld.n_candidates: {cfg.n_candidates} must be between 2 and {len(QUALITY_ORDER)}")
    for name in ("val_fraction", "test_fraction"):
        if not 0 < getattr(cfg, name) < 0.5:
            raise ConfigError(f"supportworld.{name}: {getattr(cfg, name)} must be in (0, 0.5)")


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _write_splits(root: Path, rows_by_split: dict[str, list[dict[str, Any]]], files: dict[str, Any],
                  out_dir: Path) -> None:
    for split in SPLITS:
        path = root / f"{split}.jsonl"
        n = write_jsonl(path, rows_by_split[split])
        files[path.relative_to(out_dir).as_posix()] = {"rows": n, "bytes": path.stat().st_size}


def _by_split(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group rows by their ``split`` field, which is dropped from the written rows."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for row in rows:
        split = row.pop("split")
        out[split].append(row)
    return out


def _counts(rows_by_split: dict[str, list[dict[str, Any]]], key: str) -> dict[str, dict[str, int]]:
    return {s: dict(sorted(collections.Counter(r[key] for r in rows).items())) for s, rows in rows_by_split.items()}


def generate(cfg: SupportWorldConfig, out_dir: Path) -> dict[str, Path]:
    """Write the SupportWorld corpus and task data under ``out_dir``; return name -> path of what was written."""
    _check(cfg)
    out_dir = Path(out_dir)
    world = make_world(cfg.seed, cfg.n_products, cfg.n_customers, cfg.val_fraction, cfg.test_fraction)
    files: dict[str, Any] = {}
    labels: dict[str, Any] = {}
    written: dict[str, Path] = {}

    # Pre-training corpus (streamed: it is the one output that grows with a preset).
    corpus_path = out_dir / "corpus.jsonl"
    sources: collections.Counter[str] = collections.Counter()

    def counted(docs: Iterable[dict[str, str]]) -> Iterable[dict[str, str]]:
        for doc in docs:
            sources[doc["source"]] += 1
            yield doc

    share = cfg.record_notes + cfg.transcripts
    docs = corpus_docs(world, cfg.seed, cfg.corpus_mb * (1 - share))
    extra: list[dict[str, str]] = []
    if cfg.record_notes > 0:
        extra += record_notes(world, cfg.seed, int(cfg.corpus_mb * cfg.record_notes * 1_000_000), cfg.derived_dates)
    if cfg.transcripts > 0:
        extra += support_transcripts(world, cfg.seed, int(cfg.corpus_mb * cfg.transcripts * 1_000_000),
                                     cfg.derived_dates)
    if extra:
        rng_for(cfg.seed, "corpus-mix").shuffle(extra)
        docs = interleave(docs, extra)
    n_docs = write_jsonl(corpus_path, counted(docs))
    files["corpus.jsonl"] = {"rows": n_docs, "bytes": corpus_path.stat().st_size}
    written["corpus"] = corpus_path

    # Reviews and tags: split by product.
    reviews = _by_split(generate_reviews(world, cfg.seed, cfg.n_reviews))
    _write_splits(out_dir / "reviews", reviews, files, out_dir)
    labels["reviews"] = {"label": _counts(reviews, "label"), "stars": _counts(reviews, "stars"),
                         "kind": _counts(reviews, "kind")}
    tags = _by_split(generate_tags(world, cfg.seed, max(10, cfg.n_reviews // 2)))
    _write_splits(out_dir / "tags", tags, files, out_dir)
    labels["tags"] = {s: dict(sorted(collections.Counter(t for r in rows for t in r["tags"]).items()))
                      for s, rows in tags.items()}

    # Conversations and what derives from them: split by customer.
    convs: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    intents: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    cands: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    prefs: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for conv, cand_row in generate_conversations(world, cfg.seed, cfg.n_conversations, cfg.n_candidates,
                                                    cfg.derived_dates):
        convs[conv.split].append({"id": conv.id, "messages": conv.messages, "intent": conv.intent,
                                  "record": conv.record})
        intents[conv.split].append({"id": conv.id.replace("conv-", "intent-"), "text": conv.messages[1]["content"],
                                    "label": conv.intent})
        cands[conv.split].append(cand_row)
        prefs[conv.split].extend(preference_rows(cand_row))
    # Refusal conversations join the support conversations (SFT) and give preference pairs: the refusal
    # against complying. They are not intents of the intent classifier (the customer asked for something).
    safe_texts: dict[str, list[tuple[str, str]]] = {
        s: [("prompt", r["messages"][1]["content"]) for r in rows] + [("answer", r["messages"][-1]["content"])
                                                                       for r in rows if r["messages"][-1]["role"]
                                                                       == "assistant"]
        for s, rows in convs.items()}
    for row in refusal_conversations(world, rng_for(cfg.seed, "refusals"),
                                     round(cfg.refusal_share * cfg.n_conversations)):
        split, rejected = row.pop("split"), row.pop("rejected")
        convs[split].append(row)
        prefs[split].append({"id": row["id"].replace("refusal-", "pref-refusal-"), "prompt": row["messages"][:2],
                             "chosen": [row["messages"][2]], "rejected": [{"role": "assistant", "content": rejected}]})
    # A held-out intent text that also occurs in train would test memory, not understanding: drop it.
    train_texts = {_norm(r["text"]) for r in intents["train"]}
    dropped = {s: sum(_norm(r["text"]) in train_texts for r in intents[s]) for s in ("val", "test")}
    for s in ("val", "test"):
        intents[s] = [r for r in intents[s] if _norm(r["text"]) not in train_texts]
    for name, rows in (("conversations", convs), ("intents", intents), ("candidates", cands),
                       ("preferences", prefs)):
        _write_splits(out_dir / name, rows, files, out_dir)
    labels["conversations"] = _counts(convs, "intent")
    labels["intents"] = _counts(intents, "label")
    labels["candidates"] = {s: dict(sorted(collections.Counter(c["quality"] for r in rows
                                                               for c in r["candidates"]).items()))
                            for s, rows in cands.items()}

    safety = _by_split(moderation_rows(world, rng_for(cfg.seed, "moderation"), cfg.n_moderation, safe_texts)) \
        if cfg.n_moderation else {s: [] for s in SPLITS}
    if cfg.n_moderation:
        _write_splits(out_dir / "safety", safety, files, out_dir)
        labels["safety"] = _counts(safety, "label")
    redteam_path = out_dir / "safety" / "redteam.jsonl"
    n_red = write_jsonl(redteam_path, redteam_rows(world, rng_for(cfg.seed, "redteam"), cfg.n_redteam))
    files["safety/redteam.jsonl"] = {"rows": n_red, "bytes": redteam_path.stat().st_size}

    translations = _by_split(generate_translations(cfg.seed, cfg.n_translations, cfg.val_fraction,
                                                   cfg.test_fraction))
    _write_splits(out_dir / "translation", translations, files, out_dir)

    for name in TASKS:
        written[name] = out_dir / name
    manifest = {
        "name": "SupportWorld",
        "version": VERSION,
        "config": dataclasses.asdict(cfg),
        "files": dict(sorted(files.items())),
        "corpus": {"docs": n_docs, "sources": dict(sorted(sources.items()))},
        "entities": {
            "products": dict(collections.Counter(world.product_split[p.id] for p in world.products)),
            "customers": dict(collections.Counter(world.customer_split[c.id] for c in world.customers)),
            "split_by": {"reviews": "product", "tags": "product", "conversations": "customer",
                         "intents": "customer", "candidates": "customer", "preferences": "customer",
                         "safety": "template (held-out templates for val/test; red-team templates only in redteam)",
                         "translation": "sentence"},
        },
        "labels": labels,
        "label_rule": LABEL_RULE,
        "intents": list(INTENTS),
        "tag_set": list(TAGS),
        "candidate_qualities": list(QUALITY_ORDER),
        "held_out_intent_duplicates_dropped": dropped,
    }
    manifest_path = out_dir / "supportworld.json"
    write_json(manifest_path, manifest)
    written["manifest"] = manifest_path
    return written
