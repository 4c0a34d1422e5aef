"""The pre-training corpus: help-centre articles and product pages, up to ``corpus_mb``.

Documents alternate between the help centre and the catalogue. The first pass
over the catalogue gives every product its detail page (in catalogue order);
after that, product documents are drawn at random among detail pages, Q&A pages,
care guides and buying guides, so a large corpus keeps adding new text instead
of re-rendering the same pages.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.articles import TOPICS, make_article
from chatforge.data.supportworld.products import buying_guide, care_guide, product_page, product_qa_page
from chatforge.data.supportworld.text import pick, rng_for

PRODUCT_STYLES = ("page", "page", "qa", "care", "guide")


def corpus_docs(world: w.World, seed: int, corpus_mb: float) -> Iterator[dict[str, str]]:
    """``{"id", "text", "source"}`` documents until their UTF-8 text adds up to ``corpus_mb`` MB."""
    target = int(corpus_mb * 1_000_000)
    art_rng, prod_rng = rng_for(seed, "articles"), rng_for(seed, "product-pages")
    by_category: dict[str, list[w.Product]] = collections.defaultdict(list)
    for p in world.products:
        by_category[p.category].append(p)
    total = 0
    n_art = n_prod = 0
    while total < target:
        if n_art <= n_prod:
            topic = TOPICS[n_art % len(TOPICS)]
            doc = {"id": f"help-{topic.key}-{n_art:06d}", "text": make_article(art_rng, topic, world),
                   "source": "supportworld/help"}
            n_art += 1
        else:
            if n_prod < len(world.products):
                p, style = world.products[n_prod], "page"
            else:
                p, style = pick(prod_rng, world.products), pick(prod_rng, PRODUCT_STYLES)
            if style == "page":
                text = product_page(p, prod_rng)
            elif style == "qa":
                text = product_qa_page(p, prod_rng)
            elif style == "care":
                text = care_guide(p, prod_rng)
            else:
                same = by_category[p.category]
                others = prod_rng.sample([q for q in same if q.id != p.id], min(len(same) - 1, prod_rng.randint(2, 4)))
                text = buying_guide([p, *others], prod_rng)
            doc = {"id": f"product-{p.id}-{style}-{n_prod:06d}", "text": text, "source": "supportworld/products"}
            n_prod += 1
        total += len(doc["text"].encode("utf-8"))
        yield doc


def interleave(docs: Iterator[dict[str, str]], extra: list[dict[str, str]]) -> Iterator[dict[str, str]]:
    """``docs`` with ``extra`` spread evenly among them (the corpus is written in order)."""
    main = list(docs)
    if not main:
        yield from extra
        return
    step = len(main) / max(1, len(extra))
    k = 0
    for i, doc in enumerate(main):
        yield doc
        while k < len(extra) and k * step <= i:
            yield extra[k]
            k += 1
    yield from extra[k:]
