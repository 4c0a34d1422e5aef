"""Pre-training documents that can only be written by reading the record above them.

Help articles and product pages never need a fact from earlier in the document, so a
corpus of them alone gives pre-training no reason to read a record, and its tokenizer
never sees the chat's words (customer names split into 2-3 pieces). Two kinds of
document fix the data side of that ("Physics of Language Models": a skill is learned
only when the data demands it):

* **record notes** (``record_notes``): an account record in the exact one-line-per-order
  form of the support prompts (``orders.render_record``), then a few lines an agent might
  log about it, every fact copied from the record: the customer's own name, the order
  numbers, their statuses, dates and totals;
* **support transcripts** (``support_transcripts``): fresh support conversations, drawn
  by the same generator as the SFT set from their own random stream, as plain text
  (``Record:`` block, then ``Customer:`` / ``Agent:`` turns), so pre-training already
  sees conversation-style text (nanochat's mid-training, folded into the one corpus).

Only customers of the training split get either, so no held-out customer's record is
seen before evaluation. What they do and do not buy is measured in the assistant-quality
notes: on the tiny preset they raise SFT's status and BLEU, but 700 pre-training steps
still form no in-context copying (the copy probe's ratio stays at 1.0).
"""

from __future__ import annotations

import datetime as dt
import random

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.orders import Order, make_items, make_order, new_order_id, render_record
from chatforge.data.supportworld.text import fmt_date, fmt_money, pick

HEADINGS = ("Agent notes", "Case summary", "Account notes", "Notes for the next agent")


def _order_fact(rng: random.Random, o: Order) -> str:
    facts = [f"order {o.id} is {o.status}", f"order {o.id} was placed on {fmt_date(o.placed)}",
             f"order {o.id} totals {fmt_money(o.total)}", f"order {o.id} was paid with {o.payment}",
             f"order {o.id} holds the {o.first.product.name}"]
    if o.delivered:
        facts.append(f"order {o.id} was delivered on {fmt_date(o.delivered)}")
    if o.tracking:
        facts.append(f"order {o.id} shipped with {o.carrier}, tracking {o.tracking}")
    return pick(rng, facts)


def record_note(rng: random.Random, c: w.Customer, products: list[w.Product], used_ids: set[str],
                derived_dates: bool = False) -> str:
    """One record and the notes that copy from it."""
    today = dt.date(2024, 1, 15) + dt.timedelta(days=rng.randrange(530))
    orders = [make_order(rng, new_order_id(rng, used_ids), make_items(rng, products), c.tier, today,
                         pick(rng, w.STATUSES)) for _ in range(rng.randint(1, 3))]
    record = render_record(rng, c, today, orders[0], orders[1:], derived_dates=derived_dates)
    asked = pick(rng, orders)
    lines = [f"{pick(rng, HEADINGS)}:",
             f"- Spoke with {c.first} {c.last} about order {asked.id}, which is {asked.status}.",
             f"- {c.first} is a {c.tier} member; the email on file is {c.email}."]
    for _ in range(rng.randint(1, 3)):
        fact = _order_fact(rng, pick(rng, orders))
        lines.append(f"- {fact[0].upper()}{fact[1:]}.")
    lines.append(f"- Reply sent to {c.first}: order {asked.id} is {asked.status}.")
    return record + "\n\n" + "\n".join(lines)


def record_notes(world: w.World, seed: int, target_bytes: int, derived_dates: bool = False) -> list[dict[str, str]]:
    """Notes about training-split customers until their text adds up to ``target_bytes``."""
    from chatforge.data.supportworld.text import rng_for

    rng = rng_for(seed, "record-notes")
    customers = world.customers_in("train") or world.customers
    used: set[str] = set()
    docs, total = [], 0
    while total < target_bytes:
        text = record_note(rng, pick(rng, customers), world.products, used, derived_dates)
        docs.append({"id": f"note-{len(docs):06d}", "text": text, "source": "supportworld/notes"})
        total += len(text.encode("utf-8"))
    return docs


ROLE_NAMES = {"user": "Customer", "assistant": "Agent"}


def transcript_text(messages: list[dict[str, str]]) -> str:
    """A support conversation as a plain pre-training document: the agent's record, then the turns."""
    parts = ["Support chat. Record:\n" + messages[0]["content"]] if messages and messages[0]["role"] == "system" else []
    parts += [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages if m["role"] in ROLE_NAMES]
    return "\n\n".join(parts)


def support_transcripts(world: w.World, seed: int, target_bytes: int, derived_dates: bool = False
                        ) -> list[dict[str, str]]:
    """Fresh support conversations of training-split customers (their own random stream, so none is
    an SFT row), as plain text, until they add up to ``target_bytes``. The agent's turns quote the
    record above them (name, order number, status), which is the reading the chat model must do;
    seen in pre-training, that reading has hundreds more steps to form (nanochat mid-trains on
    conversations for the same reason)."""
    from chatforge.data.supportworld.answers import INTENTS
    from chatforge.data.supportworld.conversations import make_conversation
    from chatforge.data.supportworld.text import rng_for

    rng = rng_for(seed, "support-transcripts")
    customers = world.customers_in("train") or world.customers
    used: set[str] = set()
    docs, total = [], 0
    while total < target_bytes:
        conv = make_conversation(rng, len(docs), pick(rng, INTENTS), pick(rng, customers), "train",
                                 world.products, used, derived_dates)
        text = transcript_text(conv.messages)
        docs.append({"id": f"transcript-{len(docs):06d}", "text": text, "source": "supportworld/transcripts"})
        total += len(text.encode("utf-8"))
    return docs
