"""Product pages for the corpus: product detail pages, Q&A pages, buying guides, care guides.

Every statement is derived from the ``Product`` record (material, colours, sizes,
warranty, ...) and the shop policies, so a model pre-trained on these pages and a
support answer about the same product agree. Care instructions are per material
group; buying guides compare several products of one category.
"""

from __future__ import annotations

import random
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.articles import CLOSINGS, POLICY_VALUES, fmt_price
from chatforge.data.supportworld.text import (
    a_an,
    bullet_list,
    capitalize,
    derive_seed,
    expand,
    fmt_money,
    join_words,
    paragraph,
    pick,
    sample_lines,
    sentence,
)

# Material -> care group; each group has its own instructions.
CARE_GROUP = {
    **dict.fromkeys(("merino wool", "cashmere blend", "wool blend", "wool"), "wool"),
    **dict.fromkeys(("organic cotton", "linen", "bamboo jersey", "cotton canvas", "canvas", "jute"), "cotton"),
    **dict.fromkeys(("recycled polyester", "recycled nylon", "softshell", "ripstop polyester", "ripstop nylon",
                     "ballistic nylon", "knit mesh", "neoprene", "TPE foam"), "synthetic"),
    "down-filled nylon": "down",
    **dict.fromkeys(("waxed cotton", "waxed canvas"), "waxed"),
    **dict.fromkeys(("suede", "full-grain leather", "nubuck"), "leather"),
    **dict.fromkeys(("recycled rubber", "natural rubber", "latex"), "rubber"),
    **dict.fromkeys(("stainless steel", "titanium", "aluminium", "anodised aluminium", "brushed brass",
                     "carbon fibre"), "metal"),
    **dict.fromkeys(("cast iron", "carbon steel"), "iron"),
    **dict.fromkeys(("acacia wood", "oak", "cork"), "wood"),
    **dict.fromkeys(("borosilicate glass", "ceramic"), "ceramic"),
    **dict.fromkeys(("recycled plastic", "silicone", "fabric-wrapped"), "device"),
}

CARE = {
    "wool": ("Hand wash [cold|in cold water] or use the wool cycle[ of your machine|].", "Dry flat[ in the shade|], "
             "away from [direct heat|radiators].", "[Air it|Let it air] between wears; wool rarely needs washing.",
             "Remove pills with a [wool comb|fabric shaver]."),
    "cotton": ("Machine wash at 30 degrees with similar colours.", "[Tumble dry low|Line dry] to keep the shape.",
               "Iron on a medium setting[ if needed|].", "Wash inside out to keep the colour [bright|fresh]."),
    "synthetic": ("Machine wash cold on a gentle cycle.", "Don't use fabric softener[; it clogs the fibres|].",
                  "Line dry; [keep it away from|avoid] high heat.", "Spot-clean small marks with a damp cloth."),
    "down": ("Machine wash cold with a down wash[ on a gentle cycle|].", "Tumble dry low with two clean tennis balls "
             "to restore the loft.", "Store it loose, not compressed[, between seasons|]."),
    "waxed": ("Don't machine wash; [wipe|sponge] it clean with cold water.", "Re-wax once a year to keep it "
              "water-repellent.", "Let it dry naturally at room temperature."),
    "leather": ("Brush off dirt [after each wear|regularly] with a soft brush.", "Treat with a leather or suede "
                "protector [before first use|before the first wear].", "Let wet leather dry naturally, away from "
                "heat.", "Use shoe trees to keep the shape."),
    "rubber": ("Wipe clean with warm soapy water.", "Keep it out of direct sunlight when not in use.",
               "[Let it dry|Dry it] completely before rolling or storing."),
    "metal": ("Wash by hand in warm soapy water[ or in the dishwasher where marked|].", "Dry straight away to avoid "
              "water marks.", "Avoid [abrasive|scouring] pads on polished surfaces."),
    "iron": ("Wash by hand[ with hot water|] and dry immediately[ on the stove|].", "Rub in a thin layer of oil "
             "after each use to keep the seasoning.", "Never soak it or put it in the dishwasher."),
    "wood": ("Wipe clean with a damp cloth[; never soak it|].", "Oil it with food-safe oil once a month.",
             "Keep it away from direct heat to avoid cracks."),
    "ceramic": ("Dishwasher safe[ on the top rack|].", "Avoid sudden temperature changes[, such as cold water on a "
                "hot surface|].", "Clean with a soft sponge."),
    "gym": ("Wipe it down with a damp cloth after each workout.", "Keep it dry[ to stop rust on bare metal|].",
            "Store it off the floor[, ideally on a rack|].", "Check [grips|handles] and seams for wear now and then."),
    "device": ("Wipe with a dry, soft cloth.", "Charge with a USB-C cable[ and a 5 V charger|].", "Don't leave it "
               "in a hot car or in direct sun.", "Update the firmware from the companion app[ when prompted|]."),
}

TAGLINES = (
    "{Material_cap} {noun} [built|made] for {use}.", "[The|A] {noun} you'll reach for [every day|again and again].",
    "[Made|Designed] for {use}, [built|made] to last.", "{Brand}'s take on the classic {noun}.",
    "[Simple|Honest|Well-made] {noun}, [thoughtfully|carefully] designed.",
    "[Light|Sturdy|Comfortable] and [practical|versatile]: the {line} {noun}.",
)
DESCRIPTIONS = (
    "The {name} is {a_material} {noun} designed for {use}.",
    "[It is|It's] made from {material} and [features|comes with] {feature_list}.",
    "{Brand} [has been making|has made] {category} since {founded}, and the {line} line is one of [its|their] "
    "[best sellers|most popular].",
    "[Made|Produced] in {origin}, it [comes|is available] in {color_list}.",
    "[We|Our buyers] [like|love] it for {use}[, but it works just as well for {use2}|].",
    "[It|The {noun}] [first appeared|was launched] in {launched} and [has been updated|has been refined] since.",
    "[Every|Each] {noun} is [checked|inspected] by hand before it leaves our warehouse.",
    "[At|For] {price}, it is [good value|a well-priced choice|one of the best buys] in our {category} range.",
    "{Feature_cap} [sets it apart|makes the difference] [on|for] {use}.",
    "[Pair it|Combine it] with other {brand} pieces for a matching look.",
    "[Thanks to|With] {feature}, it [handles|copes with] {use} [with ease|without fuss].",
)
FEATURE_LINES = (
    "{Feature_cap} [for|that makes it ideal for] {use}", "{Feature_cap}, tested over months of use",
    "{Feature_cap}", "{Feature_cap} as standard", "{Feature_cap}[ that you will notice|, a detail we love]",
)
QA = (
    ("Is it good for {use}?", "[Yes,|Absolutely,] it was designed [with {use} in mind|for {use}]."),
    ("What is it made of?", "{Material_cap}."),
    ("Which colours are available?", "{Color_list_cap}."),
    ("How long is the warranty?", "{warranty} months against manufacturing defects."),
    ("Where is it made?", "In {origin}."),
    ("How much does it weigh?", "{weight} kg."),
    ("Can I return it if I change my mind?", "Yes, within {return_days} days of delivery, unused and in its "
     "original packaging."),
    ("How should I clean it?", "{care}"),
    ("Does it have {feature}?", "Yes, it does[; it's one of its best features|]."),
    ("When will it arrive?", "It [ships|leaves our warehouse] within one business day; standard delivery then takes "
     "{sta_min} to {sta_max} business days."),
)
SIZE_QA = ("Which sizes does it come in?", "{size_list}; see the size guide if you are between sizes.")
DIMS_QA = ("What are the dimensions?", "{dims}.")
REVIEW_SNIPPETS = (
    "\"[Exactly as described|Just as pictured]. The {color} is [lovely|spot on].\"",
    "\"[Great|Excellent] for {use}[, would buy again|].\"",
    "\"{Feature_cap} [really works|is brilliant].\"",
    "\"[Solid|Good] quality for the price.\"",
    "\"[Arrived quickly|Fast delivery] and [well packed|nicely packaged].\"",
)
GUIDE_TITLES = (
    "[How to choose|Choosing] [the right|a] {noun} ", "[Best|Our favourite] {category} for {use}",
    "{Category_cap}: a buying guide", "[Comparing|Compare] our {category}", "{Category_cap} [picks|favourites] for {year}",
)
GUIDE_TIPS = (
    "Think about [how you will use it|what you need it for] first: {use} needs something different from {use2}.",
    "{Material_cap} [is|feels] different from {material2}; [check|read] the care instructions before you buy.",
    "[Look for|Check for] {feature}; it makes a real difference [day to day|over time].",
    "[Mind|Check] the weight if you carry it [a lot|often].",
    "[Set|Decide on] a budget: our {category} range from {low} to {high}.",
    "Warranties run from {wmin} to {wmax} months in this range; longer usually means [sturdier|tougher] "
    "construction.",
)


def founded_year(brand: str) -> int:
    """A brand's founding year: fixed per brand name, the same in every world."""
    return 1950 + derive_seed(0, "brand", brand) % 65


def _line(p: w.Product) -> str:
    """The product line: the word after the brand in ``"{brand} {line} {Noun}"``."""
    return p.name[len(p.brand) + 1:].split(" ")[0]


def care_group(p: w.Product) -> str:
    """Which care instructions apply: by material, except that devices and gym weights have their own."""
    if p.category == "electronics":
        return "device"
    if p.category == "fitness" and p.material in ("cast iron", "neoprene"):
        return "gym"
    return CARE_GROUP.get(p.material, "synthetic")


def care_lines(p: w.Product, rng: random.Random) -> list[str]:
    group = CARE[care_group(p)]
    return [sentence(t, rng) for t in rng.sample(group, min(len(group), rng.randint(2, 3)))]


def size_list(p: w.Product) -> str:
    if not p.sizes:
        return "One size"
    return f"Sizes {p.sizes[0]} to {p.sizes[-1]}" if p.category != "footwear" else \
        f"US sizes {p.sizes[0]} to {p.sizes[-1]}"


def product_values(p: w.Product, rng: random.Random) -> dict[str, Any]:
    """Everything a template may say about a product."""
    feature = pick(rng, p.features)
    other_uses = [u for u in p.cat.uses if u != p.use]
    v: dict[str, Any] = dict(POLICY_VALUES)
    v.update({
        "name": p.name, "brand": p.brand, "Brand": p.brand, "noun": p.noun, "line": _line(p), "material": p.material,
        "Material_cap": capitalize(p.material), "a_material": a_an(p.material), "use": p.use,
        "use2": pick(rng, other_uses), "feature": feature, "Feature_cap": capitalize(feature),
        "feature_list": join_words(list(p.features)), "color": pick(rng, p.colors),
        "color_list": join_words(list(p.colors)), "Color_list_cap": capitalize(join_words(list(p.colors))),
        "origin": p.origin, "launched": p.launched, "price": fmt_money(p.price), "warranty": p.warranty_months,
        "weight": p.weight_kg, "dims": p.dims, "category": p.cat.title.lower(), "Category_cap": p.cat.title,
        "founded": founded_year(p.brand), "size_list": size_list(p),
        "care": " ".join(care_lines(p, rng)),
    })
    return v


def spec_lines(p: w.Product, rng: random.Random) -> list[str]:
    specs = [f"Material: {p.material}", f"Colours: {', '.join(p.colors)}", f"Weight: {p.weight_kg} kg",
             f"Made in: {p.origin}", f"Warranty: {p.warranty_months} months", f"Price: {fmt_money(p.price)}"]
    if p.sizes:
        specs.insert(2, f"Sizes: {', '.join(p.sizes)}")
    if p.dims:
        specs.insert(2, f"Dimensions: {p.dims}")
    specs.append(f"Product code: {p.id}")
    if rng.random() < 0.5:
        rng.shuffle(specs)
    return specs


def _qa_pairs(p: w.Product, rng: random.Random, v: dict[str, Any], k: int) -> list[tuple[str, str]]:
    pool = list(QA)
    if p.sizes:
        pool.append(SIZE_QA)
    if p.dims:
        pool.append(DIMS_QA)
    return [(sentence(q, rng, v), sentence(a, rng, v)) for q, a in rng.sample(pool, min(k, len(pool)))]


def product_page(p: w.Product, rng: random.Random) -> str:
    """A product detail page: tagline, description, features, specs, care, delivery, Q&A."""
    v = product_values(p, rng)
    parts = [f"# {p.name}", sentence(pick(rng, TAGLINES), rng, {**v, "Material_cap": capitalize(p.material)}),
             paragraph(rng, DESCRIPTIONS, rng.randint(3, 6), v)]
    heads = {"features": ("Features", "Highlights", "Why you'll like it", "Key features"),
             "specs": ("Specifications", "Details", "Product details", "Tech specs"),
             "care": ("Care", "Care instructions", "Looking after your {noun}"),
             "delivery": ("Delivery and returns", "Shipping and returns", "Delivery"),
             "qa": ("Questions and answers", "Customer questions", "Q&A")}
    feats = [sentence(t, rng, {**v, "Feature_cap": capitalize(f)})
             for t, f in zip(rng.sample(FEATURE_LINES, len(p.features)), p.features)]
    parts += [f"## {pick(rng, heads['features'])}", bullet_list(feats, rng)]
    parts += [f"## {pick(rng, heads['specs'])}", bullet_list(spec_lines(p, rng), rng)]
    if rng.random() < 0.8:
        parts += [f"## {expand(pick(rng, heads['care']), rng, v)}", " ".join(care_lines(p, rng))]
    if rng.random() < 0.7:
        parts += [f"## {pick(rng, heads['delivery'])}", paragraph(rng, (
            "[It ships|This item leaves our warehouse] within one business day.",
            "Standard delivery takes {sta_min} to {sta_max} business days and is free on orders over {free_over}.",
            "Express delivery ({exp_cost}) arrives in {exp_min} to {exp_max} business days.",
            "[Free returns|Returns are free] within {return_days} days of delivery.",
            "[Not the right size|Wrong size]? Exchanges are free.",
        ), rng.randint(2, 4), v)]
    if rng.random() < 0.6:
        pairs = _qa_pairs(p, rng, v, rng.randint(2, 4))
        parts += [f"## {pick(rng, heads['qa'])}", "\n\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)]
    if rng.random() < 0.4:
        parts.append(" ".join(sample_lines(rng, REVIEW_SNIPPETS, 2, v)))
    return "\n\n".join(parts)


def product_qa_page(p: w.Product, rng: random.Random) -> str:
    """A questions-and-answers page about one product."""
    v = product_values(p, rng)
    title = expand("[Questions about|Your questions about|FAQ:] the {name}", rng, v)
    intro = paragraph(rng, DESCRIPTIONS, 2, v)
    pairs = _qa_pairs(p, rng, v, rng.randint(5, 9))
    body = "\n\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)
    return "\n\n".join([f"# {title}", intro, body, sentence(pick(rng, CLOSINGS), rng, v)])


CARE_MISTAKES = (
    "[Avoid|Don't use] [bleach|harsh detergents|scouring pads] on {material}.",
    "Don't store it [damp|while it is still wet][ in a bag or a cupboard|].",
    "[Keep it away from|Don't leave it near] radiators, fireplaces and [direct sun|hot cars].",
    "[Test|Try] any new cleaning product on a small hidden spot first.",
    "[Read|Check] the care label before the first wash or clean[; it is sewn or printed on every product|].",
    "A little care after each use saves a lot of work later[, especially for {use}|].",
    "[Storing|Putting away] it [clean and dry|dry and clean] is the single best thing you can do for it.",
)


def care_guide(p: w.Product, rng: random.Random) -> str:
    """How to look after a product: its material's instructions, common mistakes, a word on the warranty."""
    v = product_values(p, rng)
    v["a_noun"] = f"{a_an(p.material)} {p.noun}" if p.noun not in w.PLURAL_NOUNS else f"{p.material} {p.noun}"
    group = CARE[care_group(p)]
    title = expand("[How to care for|Caring for|Looking after|Cleaning and storing] your {material} {noun}", rng, v)
    intro = sentence("[Good care|A little care] [makes {a_noun} last for years|keeps {a_noun} looking new for "
                     "longer]. [These tips use the {name} as an example, but they apply|This guide uses the {name} as "
                     "its example, but it applies] to [any|every] {material} {noun}.", rng, v)
    chosen = rng.sample(group, rng.randint(min(2, len(group)), len(group)))
    steps = "\n".join(f"{i}. {sentence(t, rng)}" for i, t in enumerate(chosen, start=1))
    parts = [f"# {title}", intro, steps]
    if rng.random() < 0.7:
        parts += [f"## {pick(rng, ('Common mistakes', 'What to avoid', 'Good habits'))}",
                  paragraph(rng, CARE_MISTAKES, rng.randint(2, 4), v)]
    parts.append(paragraph(rng, DESCRIPTIONS, rng.randint(1, 3), v))
    if rng.random() < 0.5:
        parts.append("\n\n".join(f"Q: {q}\nA: {a}" for q, a in _qa_pairs(p, rng, v, rng.randint(1, 3))))
    parts.append(sentence("[Warranty note|Please note]: damage from ignoring the care instructions is not covered "
                          "by the {warranty}-month warranty[, which covers manufacturing defects only|].", rng, v))
    return "\n\n".join(parts)


def buying_guide(products: list[w.Product], rng: random.Random) -> str:
    """Compares several products of one category."""
    first = products[0]
    v = product_values(first, rng)
    prices = [p.price for p in products]
    warranties = [p.warranty_months for p in products]
    others = [m for m in first.cat.materials if m != first.material]
    v.update({"low": fmt_price(min(prices)), "high": fmt_price(max(prices)), "wmin": min(warranties),
              "wmax": max(warranties), "material2": pick(rng, others), "year": rng.randint(2022, 2025),
              "Category_cap": first.cat.title})
    parts = [f"# {sentence(pick(rng, GUIDE_TITLES), rng, v)}", paragraph(rng, GUIDE_TIPS, rng.randint(3, 5), v)]
    parts.append(sentence("[Here are|These are] [our picks|the ones we recommend|{n} to consider]:", rng,
                          {"n": len(products)}))
    for p in products:
        pv = product_values(p, rng)
        head = f"**{p.name}** ({fmt_money(p.price)})"
        parts.append(head + "\n" + paragraph(rng, DESCRIPTIONS, rng.randint(2, 3), pv))
    cheapest = min(products, key=lambda p: p.price)
    longest = max(products, key=lambda p: p.warranty_months)
    parts.append(sentence(
        "[On a budget|Watching the price]? The {cheap} is the [least expensive|cheapest] here at {cheap_price}. "
        "[For the longest cover|If warranty matters most], the {long} comes with {months} months.", rng,
        {"cheap": cheapest.name, "cheap_price": fmt_money(cheapest.price), "long": longest.name,
         "months": longest.warranty_months}))
    parts.append(sentence(pick(rng, CLOSINGS), rng, v))
    return "\n\n".join(parts)
