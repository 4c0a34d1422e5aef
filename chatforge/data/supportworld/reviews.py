"""Product reviews for sentiment classification, with hard cases.

The label rule: a review's stars are drawn first and the text is written for
them; ``label`` is ``negative`` for 1-2 stars, ``neutral`` for 3 and ``positive``
for 4-5. Stars rate the product itself: remarks about delivery, packaging or
service never move them, so "great sweater, terrible delivery" is a positive
review and "fast delivery, shame about the kettle" a negative one. The ``kind``
field names the case:

* ``plain``: sentences of one polarity (both, for 3 stars);
* ``mixed``: the product verdict plus a delivery/service remark of the opposite
  polarity;
* ``sarcasm``: praise words with a negative meaning (1-2 stars only);
* ``negation``: the polarity carried by negated words ("not bad at all",
  "wouldn't recommend", "can't say I love it").

Reviews are split by product (``world.product_split``), and every text is unique,
so no held-out review is a copy of a training one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.text import add_typos, capitalize, casual, fmt_money, pick, rng_for, sentence

STAR_WEIGHTS = {1: 14, 2: 14, 3: 20, 4: 24, 5: 28}
KIND_WEIGHTS = {"plain": 58, "mixed": 15, "sarcasm": 12, "negation": 15}


def label_for(stars: int) -> str:
    """The one rule from stars to label."""
    if not 1 <= stars <= 5:
        raise ValueError(f"stars must be 1-5, got {stars}")
    return "negative" if stars <= 2 else "neutral" if stars == 3 else "positive"


POS = (
    "[Love|Really like|Absolutely love] this {noun}.", "The {material} feels [great|really nice|premium|sturdy].",
    "{Feature} [works really well|is a great touch|is exactly what I wanted].", "[Perfect|Ideal|Great] for {use}.",
    "The {color} is [even nicer in person|exactly as pictured|lovely in person].", "[Great|Excellent|Solid] quality for {price}.",
    "I've used it for [a month|three weeks|two months|half a year] and it still looks new.",
    "[Would|I'd] [definitely |]buy again.", "[Highly recommend|Recommended] if you need something for {use}.",
    "{Brand} [has done it again|never disappoints].", "My [partner|sister|son|friend] [wants|asked for] one too.",
    "[Really|Very] happy with [it|this purchase|my {noun}].", "[Well made|Beautifully made] and [built to last|"
    "sturdy].", "Exactly what I was looking for.", "[Honestly|Genuinely] one of the best things I've bought this "
    "year.",
)
POS_SIZED = ("[Fits|It fits] [perfectly|true to size] in {size}.", "Size {size} was spot on.")
NEG = (
    "The {material} [feels cheap|is thinner than it looks|started to wear after a week].",
    "{Feature} [stopped working|broke|is useless] after [a week|two weeks|a few days].",
    "[Bad|Terrible|Useless] for {use}.", "The {color} looks [nothing like|completely different from] the photos.",
    "[Poor|Disappointing] quality for {price}.", "[It|The {noun}] [fell apart|broke|came apart] within a month.",
    "[I'm sending it back|I'm returning it|Back it goes].", "[Expected|I expected] much more from {brand}.",
    "[Really|Very] disappointed with [it|this purchase|my {noun}].", "[Honestly|Frankly] a waste of money.",
    "[Avoid|Save your money].", "[Cheaply|Badly] made and [flimsy|wobbly].",
)
NEG_SIZED = ("[Runs|It runs] [small|large]: the {size} [was way too tight|was huge on me].",
             "The {size} is [nowhere near|not even close to] a real {size}.")
NEUTRAL = (
    "It's [okay|fine|alright].", "[Does the job|It does what it says], nothing special.",
    "[Decent|Average] for {price}.", "[It's a perfectly|Perfectly] ordinary {noun}.",
    "[Might|May] keep it, [not sure yet|haven't decided].", "[Some good points|Good in some ways], [some not so good|"
    "a few downsides].", "[Middle of the road|Pretty average], to be honest.", "[Neither great nor terrible|Fine, "
    "just fine].",
)
DELIVERY_POS = ("Delivery was [super fast|quick|on time].", "[It arrived|Arrived] [a day early|well packed|in two "
                "days].", "[Great|Friendly|Helpful] customer service.", "The parcel came [quickly|sooner than "
                "expected].")
DELIVERY_NEG = ("Delivery took [forever|almost three weeks|way longer than promised].", "The box arrived [crushed|"
                "soaking wet|half open].", "[Customer service|Support] [never replied|was useless].",
                "The tracking [never updated|was useless].")
MIXED_POS = ("[Great|Lovely|Fantastic] {noun}, [terrible|awful|painfully slow] delivery.",
             "[Delivery was a mess|The delivery was a nightmare], but the {noun} itself is [great|excellent].",
             "Ignore the shipping drama: the {noun} is [excellent|brilliant|exactly right].")
MIXED_NEG = ("Delivery was [lightning fast|great|quick], [shame|pity] about the {noun}.",
             "[Lovely|Great] packaging and [fast|quick] shipping, but the {noun} [itself |]is [a letdown|rubbish].",
             "Five stars for the courier, not for the {noun}.")
SARCASM = (
    "Oh [great|wonderful|fantastic], the {noun} [fell apart|broke] after two days. [Exactly what I paid {price} for|"
    "Money well spent].",
    "[Love|Just love] how the {color} turned a different colour after [one wash|a week|a month]. [Truly|Really] premium {material}.",
    "[Ten out of ten|Five stars] for teaching me patience: {feature} gave up on day three.",
    "Wow, a {noun} that can't handle {use}. [Impressive|Brilliant].",
    "[Best|Greatest] purchase ever, if you enjoy [returns|disappointment].",
    "[Amazing|Incredible] how something this expensive can feel this cheap.",
    "Sure, I [totally|absolutely] wanted a {noun} that [wobbles|squeaks|leaks]. [Thanks|Cheers], {brand}.",
    "What a [treat|delight]: {feature} [works|worked] for almost a whole week.",
)
NEGATION_POS = (
    "[Not bad at all|Can't complain|Not disappointed in the slightest|Never had a problem with it].",
    "I [wasn't sure|didn't expect much], but it [isn't flimsy at all|doesn't feel cheap at all].",
    "No complaints about the {material}.", "[Couldn't be happier|Could not be happier].",
    "[Not once|Never] [has it let me down|did it let me down].", "Nothing to dislike, [really|honestly].",
    "I [can't|cannot] fault it for {use}.",
)
NEGATION_NEG = (
    "[Not|Definitely not] worth {price}.", "[Doesn't|Does not] [work|hold up] as [described|advertised].",
    "[Not comfortable|Not sturdy|Not well made] at all.", "I wouldn't [buy it again|recommend it to anyone].",
    "[Never|Not once] [worked|fitted] properly.", "[Not|Hardly] what I [hoped|paid] for.",
)
NEGATION_NEUTRAL = ("Not bad, but not great either.", "Can't say I love it, can't say I hate it.",
                    "Not the best, not the worst.", "I don't dislike it, but I wouldn't rave about it either.")
TITLES = {
    "positive": ("[Love it|Great buy|Very happy|Recommended]!", "[Excellent|Superb|Lovely] {noun}"),
    "negative": ("[Disappointed|Not happy|Avoid]", "[Poor|Bad] {noun}"),
    "neutral": ("[It's okay|Fine|Average]", "[Decent|Okay] {noun}"),
}


def _values(p: w.Product, rng: random.Random) -> dict[str, Any]:
    return {"noun": w.singular(p.noun), "material": p.material, "Feature": capitalize(pick(rng, p.features)),
            "feature": pick(rng, p.features), "use": p.use, "color": pick(rng, p.colors), "brand": p.brand,
            "Brand": p.brand, "price": fmt_money(p.price), "size": pick(rng, p.sizes) if p.sizes else ""}


def _pool(p: w.Product, base: tuple[str, ...], sized: tuple[str, ...]) -> list[str]:
    return list(base) + (list(sized) if p.sizes else [])


def _sample(rng: random.Random, pool: list[str], k: int, values: dict[str, Any]) -> list[str]:
    return [sentence(t, rng, values) for t in rng.sample(pool, min(k, len(pool)))]


def write_review(p: w.Product, stars: int, kind: str, rng: random.Random) -> str:
    """The text of one review with these stars, in the style of ``kind``."""
    v = _values(p, rng)
    label = label_for(stars)
    pos, neg = _pool(p, POS, POS_SIZED), _pool(p, NEG, NEG_SIZED)
    if kind == "sarcasm":
        parts = _sample(rng, list(SARCASM), rng.randint(1, 2), v) + _sample(rng, neg, rng.randint(0, 1), v)
    elif kind == "negation":
        own = {"positive": NEGATION_POS, "negative": NEGATION_NEG, "neutral": NEGATION_NEUTRAL}[label]
        parts = _sample(rng, list(own), rng.randint(1, 2), v)
        if label != "neutral" and rng.random() < 0.5:
            parts += _sample(rng, pos if label == "positive" else neg, 1, v)
    elif kind == "mixed":
        if label == "positive":
            parts = _sample(rng, list(MIXED_POS), 1, v) + _sample(rng, pos, rng.randint(1, 2), v) + \
                _sample(rng, list(DELIVERY_NEG), 1, v)
        elif label == "negative":
            parts = _sample(rng, list(MIXED_NEG), 1, v) + _sample(rng, neg, rng.randint(1, 2), v) + \
                _sample(rng, list(DELIVERY_POS), 1, v)
        else:  # neutral product, delivery remark of either polarity
            parts = _sample(rng, list(NEUTRAL), rng.randint(1, 2), v) + \
                _sample(rng, list(pick(rng, (DELIVERY_POS, DELIVERY_NEG))), 1, v)
    else:
        if label == "positive":
            parts = _sample(rng, pos, rng.randint(1, 3) + (stars == 5), v)
        elif label == "negative":
            parts = _sample(rng, neg, rng.randint(1, 3) + (stars == 1), v)
        else:
            parts = _sample(rng, list(NEUTRAL), 1, v) + _sample(rng, pos, 1, v) + _sample(rng, neg, 1, v)
            rng.shuffle(parts)
    if kind != "mixed" and rng.random() < 0.25:
        title = sentence(pick(rng, TITLES[label]), rng, v)
        parts.insert(0, title if title.endswith(("!", ".", "?")) else f"{title}.")
    text = " ".join(parts)
    if rng.random() < 0.2:
        text = casual(text, rng)
    if rng.random() < 0.25:
        text = add_typos(text, rng, rng.randint(1, 2))
    return text


def _kind(rng: random.Random, stars: int) -> str:
    kinds = [k for k in KIND_WEIGHTS if not (k == "sarcasm" and stars > 2)]
    return rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]


def generate_reviews(world: w.World, seed: int, n: int) -> Iterator[dict[str, Any]]:
    """``n`` review rows ``{"id", "product_id", "text", "stars", "label", "kind", "split"}``; texts are unique."""
    rng = rng_for(seed, "reviews")
    seen: set[str] = set()
    # Some products are reviewed much more than others, like in a real shop.
    weights = [rng.paretovariate(1.5) for _ in world.products]
    for i in range(n):
        p = rng.choices(world.products, weights=weights)[0]
        stars = rng.choices(list(STAR_WEIGHTS), weights=list(STAR_WEIGHTS.values()))[0]
        kind = _kind(rng, stars)
        text = write_review(p, stars, kind, rng)
        for _ in range(20):
            if text.casefold() not in seen:
                break
            text = write_review(p, stars, kind, rng)
        else:  # a short template family ran out of variety: add a sentence of the right polarity
            extra = {"positive": POS, "negative": NEG, "neutral": NEUTRAL}[label_for(stars)]
            while text.casefold() in seen:
                text = f"{text} {sentence(pick(rng, extra), rng, _values(p, rng))}"
        seen.add(text.casefold())
        yield {"id": f"review-{i:06d}", "product_id": p.id, "text": text, "stars": stars, "label": label_for(stars),
               "kind": kind, "split": world.product_split[p.id]}
