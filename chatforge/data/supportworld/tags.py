"""Product-attribute tagging: BIO tags on customer questions and review sentences.

Templates mark entity slots as ``<BRAND>``, ``<PRODUCT>``, ``<COLOR>``,
``<COLOR2>``, ``<MATERIAL>``, ``<SIZE>``, ``<SIZE2>`` and ``<PRICE>``; the
literal words around them may use ``[a|b]`` choices. Slot values come from one
product of the catalogue, so rows are split by product like the reviews. Each
value is tokenised with the same tokenizer as the text around it; its first
token gets ``B-TYPE`` and the rest ``I-TYPE``, everything else ``O``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.text import expand, fmt_money, pick, rng_for, typo_word

ENTITY_TYPES = ("BRAND", "PRODUCT", "COLOR", "MATERIAL", "SIZE", "PRICE")
TAGS = ("O", *(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I")))

# Money as one token; words with inner hyphens or apostrophes as one token; any other symbol alone.
TOKEN = re.compile(r"\$\d+(?:\.\d+)?|\w+(?:[-'’]\w+)*|[^\w\s]")
_SLOT = re.compile(r"<([A-Z]+2?)>")

# {is}, {it}, ... agree with the product noun (``running shoes`` are, a ``kettle`` is): _SINGULAR / _PLURAL.
TEMPLATES = (
    "Do you have the <PRODUCT> in <COLOR>?", "{Is} the <BRAND> <PRODUCT> made of <MATERIAL>?",
    "I bought the <COLOR> <PRODUCT> [last week|a month ago|yesterday] and [love {obj}|{it} {is} great|{it} broke "
    "already].", "The <MATERIAL> on my <PRODUCT> [feels cheap|feels lovely|started to wear].",
    "[Looking for|I want] {a} <COLOR> <MATERIAL> <PRODUCT> under <PRICE>.", "{Is} the <PRODUCT> still <PRICE>?",
    "My <BRAND> <PRODUCT> in <COLOR> arrived [today|this morning|yesterday].",
    "I ordered <COLOR> but [got|received] <COLOR2>.", "Love the <COLOR> colour of {this} <PRODUCT>!",
    "The <PRODUCT> from <BRAND> {is} the best <MATERIAL> {one} I own.", "Paid <PRICE> for the <PRODUCT> and "
    "[I love {obj}|I regret it].", "[Can|Could] you tell me if the <BRAND> <PRODUCT> {is} <MATERIAL>?",
    "Is there a <MATERIAL> version of the <PRODUCT> in <COLOR>?", "The <COLOR> <PRODUCT> [{looks}|{is}] [much "
    "darker|lighter|brighter] than the photo.", "Why {is} the <PRODUCT> <PRICE> now?",
    "[Got|Received] the <BRAND> <PRODUCT> for <PRICE>, [great deal|not bad]!",
)
SIZED_TEMPLATES = (
    "I bought the <COLOR> <PRODUCT> in size <SIZE> and {it} [{fits} perfectly|{is} too tight|{is} too big].",
    "Can I exchange the <SIZE> <PRODUCT> for [size|a size] <SIZE2>?",
    "{Does} the <PRODUCT> come in <SIZE> or only <SIZE2>?", "{Is} the <COLOR> <PRODUCT> available in <SIZE>?",
    "[Ordered|I ordered] size <SIZE> in the <BRAND> <PRODUCT> but [need|want] <SIZE2>.",
    "The <MATERIAL> <PRODUCT> in <SIZE> [{runs} small|{runs} large|{fits} true to size].",
)
_SINGULAR = {"is": "is", "Is": "Is", "it": "it", "obj": "it", "Does": "Does", "this": "this", "one": "one", "looks": "looks",
             "fits": "fits", "runs": "runs", "a": "a"}
_PLURAL = {"is": "are", "Is": "Are", "it": "they", "obj": "them", "Does": "Do", "this": "these", "one": "ones", "looks": "look",
           "fits": "fit", "runs": "run", "a": ""}


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text)


def _slot_values(p: w.Product, rng: Any) -> dict[str, str]:
    line = p.name[len(p.brand) + 1:].split(" ")[0]
    other_colors = [c for c in p.cat.colors if c not in p.colors] or [c for c in p.cat.colors]
    values = {"BRAND": p.brand, "PRODUCT": pick(rng, (p.noun, f"{line} {p.noun}")), "COLOR": pick(rng, p.colors),
              "COLOR2": pick(rng, other_colors), "MATERIAL": p.material, "PRICE": fmt_money(p.price)}
    if p.sizes:
        size = pick(rng, p.sizes)
        values["SIZE"] = size
        values["SIZE2"] = pick(rng, [s for s in p.sizes if s != size])
    return values


def tag_sentence(template: str, values: dict[str, str], rng: Any, lower: bool = False,
                 typo_rate: float = 0.0, plural: bool = False) -> tuple[list[str], list[str]]:
    """Tokens and BIO tags of ``template`` with its slots filled from ``values``."""
    text = expand(template, rng, _PLURAL if plural else _SINGULAR)
    tokens: list[str] = []
    tags: list[str] = []
    pos = 0
    for m in [*_SLOT.finditer(text), None]:
        literal = text[pos:m.start()] if m is not None else text[pos:]
        for tok in tokenize(literal):
            if typo_rate and tok.isalpha() and len(tok) >= 4 and rng.random() < typo_rate:
                tok = typo_word(tok, rng)
            tokens.append(tok.lower() if lower else tok)
            tags.append("O")
        if m is None:
            break
        kind = m.group(1).rstrip("2")
        for j, tok in enumerate(tokenize(values[m.group(1)])):
            tokens.append(tok.lower() if lower else tok)
            tags.append(("B-" if j == 0 else "I-") + kind)
        pos = m.end()
    for i in range(len(tokens) - 1):  # "a" before a vowel sound: the slot value decides
        if tokens[i].lower() == "a" and tokens[i + 1][:1].lower() in "aeiou":
            tokens[i] += "n"
    return tokens, tags


def generate_tags(world: w.World, seed: int, n: int) -> Iterator[dict[str, Any]]:
    """``n`` rows ``{"id", "product_id", "tokens", "tags", "split"}`` with unique token sequences."""
    rng = rng_for(seed, "tags")
    seen: set[str] = set()
    i = 0
    attempts = 0
    while i < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"tags: could not make {n} distinct sentences")
        p = pick(rng, world.products)
        templates = TEMPLATES + (SIZED_TEMPLATES if p.sizes else ())
        tokens, tags = tag_sentence(pick(rng, templates), _slot_values(p, rng), rng, lower=rng.random() < 0.2,
                                    typo_rate=0.05, plural=p.noun in w.PLURAL_NOUNS)
        key = " ".join(tokens).casefold()
        if key in seen:
            continue
        seen.add(key)
        yield {"id": f"tags-{i:06d}", "product_id": p.id, "tokens": tokens, "tags": tags,
               "split": world.product_split[p.id]}
        i += 1
