"""Help-centre articles: shipping, returns, refunds, warranty, account, payments, ...

A topic is a bag of templates (titles, intros, sections of sentences and list items,
FAQ pairs) plus an optional worked example computed from the shop's rules. An
article samples a few sections, a subset of each section's sentences and of the
FAQ, and lays them out in one of several styles (article, FAQ page, step-by-step
guide, policy page). Every fact comes from ``world`` constants, so all articles and
support answers agree; the sampling and the ``[a|b]`` paraphrases keep documents
far below the near-duplicate threshold of the clean stage.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.text import (
    add_business_days,
    bullet_list,
    expand,
    fmt_date,
    fmt_money,
    numbered_list,
    paragraph,
    pick,
    sample_lines,
    sentence,
    weekday,
)


def fmt_price(amount: float) -> str:
    """``$50`` for whole amounts, ``$4.95`` otherwise: how shops write policy prices."""
    return f"${amount:,.0f}" if float(amount).is_integer() else fmt_money(amount)


@dataclass(frozen=True)
class Section:
    headings: tuple[str, ...]
    sentences: tuple[str, ...]
    bullets: tuple[str, ...] = ()  # list items; steps when the section is a procedure
    steps: bool = False  # the bullets are ordered steps (a numbered list)


@dataclass(frozen=True)
class Topic:
    key: str
    titles: tuple[str, ...]
    intros: tuple[str, ...]
    sections: tuple[Section, ...]
    faqs: tuple[tuple[str, str], ...]
    example: Callable[[random.Random, w.World], str] | None = field(default=None)


# --------------------------------------------------------------------------- shared pieces

POLICY_VALUES: dict[str, Any] = {
    "shop": w.SHOP, "email": w.SUPPORT_EMAIL, "phone": w.SUPPORT_PHONE, "hours": w.SUPPORT_HOURS,
    "return_days": w.RETURN_DAYS, "refund_days": w.REFUND_DAYS, "free_over": fmt_price(w.FREE_SHIPPING_OVER),
    "cancel_window": w.CANCEL_WINDOW, "gift_years": w.GIFT_CARD_YEARS, "damage_days": w.DAMAGE_REPORT_DAYS,
    "price_days": w.PRICE_ADJUST_DAYS, "auth_days": w.AUTH_RELEASE_DAYS, "trace_days": w.TRACE_AFTER_DAYS,
    "lost_days": w.LOST_AFTER_DAYS, "reset_minutes": w.RESET_LINK_MINUTES, "reply_hours": w.EMAIL_REPLY_HOURS,
    "silver_spend": fmt_price(w.TIER_SPEND["Silver"]), "gold_spend": fmt_price(w.TIER_SPEND["Gold"]),
    "bronze_points": w.POINTS_PER_DOLLAR["Bronze"], "silver_points": w.POINTS_PER_DOLLAR["Silver"],
    "gold_points": w.POINTS_PER_DOLLAR["Gold"], "reward_points": w.POINTS_PER_REWARD_DOLLAR,
    "carriers": ", ".join(list(w.CARRIERS)[:-1]) + " and " + list(w.CARRIERS)[-1],
    "payment_methods": ", ".join(w.PAYMENT_METHODS[:-1]) + " and " + w.PAYMENT_METHODS[-1],
    "non_returnable": ", ".join(w.NON_RETURNABLE[:-1]) + " and " + w.NON_RETURNABLE[-1],
    "gift_min": fmt_price(w.GIFT_CARD_VALUES[0]), "gift_max": fmt_price(w.GIFT_CARD_VALUES[-1]),
}
for _key, _m in w.SHIPPING_METHODS.items():
    POLICY_VALUES[f"{_key[:3]}_cost"] = fmt_price(_m.cost)
    POLICY_VALUES[f"{_key[:3]}_min"] = _m.min_days
    POLICY_VALUES[f"{_key[:3]}_max"] = _m.max_days

CLOSINGS = (
    "[Still need help|Need more help|Can't find what you need]? Our support team is [available|here] {hours}[, by "
    "phone at {phone}, by email at {email} or in the chat| on {phone} or at {email}].",
    "[If|When] your question [isn't|is not] answered here, [write to|email] {email}; we [usually |]reply within "
    "{reply_hours} hours[, often much sooner|].",
    "[Questions|Anything unclear|Something we missed]? [Our customer care team|The {shop} support team|We] "
    "[will be happy|would be glad] to help {hours}.",
    "[You can also|Or] [reach us|contact us] [on|by phone at] {phone} {hours}[, or start a chat from your account "
    "page|].",
    "Have a question about a specific order? [Have|Keep] your order number [ready|to hand]: it starts with SW- "
    "and [is in|appears in] your confirmation email.",
)
FOOTERS = (
    "[Was this article helpful|Did this page answer your question]? [Let us know|Tell us] with the [buttons|links] "
    "[below|at the bottom of the page].",
    "[Related|See also]: {related}.",
    "[This page was last updated|Last updated|Reviewed by our support team] on {updated}.",
)
FAQ_HEADINGS = ("Frequently asked questions", "Common questions", "FAQ", "Questions we often get",
                "Quick answers", "You might also ask")


# --------------------------------------------------------------------------- worked examples


def _example_order(rng: random.Random, world: w.World) -> tuple[w.Product, dt.date, str, str]:
    product = pick(rng, world.products)
    placed = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(365))
    name = pick(rng, w.FIRST_NAMES)
    tier = rng.choices(w.LOYALTY_TIERS, weights=(6, 3, 1))[0]
    return product, placed, name, tier


def _shipping_example(rng: random.Random, world: w.World) -> str:
    product, placed, name, tier = _example_order(rng, world)
    qty = rng.choice((1, 1, 1, 2))
    subtotal = round(product.price * qty, 2)
    method = pick(rng, tuple(w.SHIPPING_METHODS))
    m = w.SHIPPING_METHODS[method]
    cost = w.shipping_cost(method, subtotal, tier)
    dispatch = add_business_days(placed, 1)
    earliest, latest = add_business_days(dispatch, m.min_days), add_business_days(dispatch, m.max_days)
    what = product.name if qty == 1 else f"two of the {product.name}"
    why = ""
    if cost == 0 and method != "express" and subtotal >= w.FREE_SHIPPING_OVER:
        why = f", because the order is over {fmt_price(w.FREE_SHIPPING_OVER)}"
    elif cost == 0:
        why = f", a perk of the {tier} tier"
    return sentence(
        "[For example|Here is an example]: {name}, a {tier} member, orders {what} ({subtotal}) on {wd}, {placed} "
        "and [picks|chooses] {method} shipping. Shipping costs {cost}{why}. The parcel [leaves our warehouse|is "
        "dispatched] on {dispatch} and [should arrive|is due] between {earliest} and {latest}.",
        rng, {"name": name, "tier": tier, "what": what, "subtotal": fmt_money(subtotal), "wd": weekday(placed),
              "placed": fmt_date(placed), "method": method, "cost": fmt_money(cost) if cost else "nothing", "why": why,
              "dispatch": fmt_date(dispatch), "earliest": fmt_date(earliest), "latest": fmt_date(latest)})


def _returns_example(rng: random.Random, world: w.World) -> str:
    product, placed, name, _ = _example_order(rng, world)
    delivered = add_business_days(placed, rng.randint(2, 7))
    last = delivered + dt.timedelta(days=w.RETURN_DAYS)
    late = last + dt.timedelta(days=rng.randint(1, 20))
    return sentence(
        "[For example|Say], {name}'s {noun} was delivered on {delivered}. [The return window ends on|The last "
        "day to start a return is] {last}[, 30 days later|]. A return started on {late} [is outside the "
        "window|would be too late], [but|although] a faulty item [is still covered by|can still go through] the "
        "{months}-month warranty.",
        rng, {"name": name, "noun": product.noun, "delivered": fmt_date(delivered), "last": fmt_date(last),
              "late": fmt_date(late), "months": product.warranty_months})


def _refund_example(rng: random.Random, world: w.World) -> str:
    product, placed, name, _ = _example_order(rng, world)
    received = add_business_days(placed, rng.randint(10, 30))
    issued = add_business_days(received, rng.randint(1, 2))
    lo, hi = add_business_days(issued, 5), add_business_days(issued, 10)
    return sentence(
        "[For example|To give an example], {name} returns a {noun} that cost {price}. We [receive|get] the parcel "
        "on {received} and issue the refund on {issued}; [depending on the bank|depending on the card issuer], "
        "the {price} [shows up|appears] on the statement between {lo} and {hi}.",
        rng, {"name": name, "noun": product.noun, "price": fmt_money(product.price), "received": fmt_date(received),
              "issued": fmt_date(issued), "lo": fmt_date(lo), "hi": fmt_date(hi)})


def _warranty_example(rng: random.Random, world: w.World) -> str:
    product, placed, name, _ = _example_order(rng, world)
    months = product.warranty_months
    end_year, end_month = placed.year + (placed.month - 1 + months) // 12, (placed.month - 1 + months) % 12 + 1
    end = dt.date(end_year, end_month, min(placed.day, 28))
    return sentence(
        "[For example|As an example], the {name} [comes with|has] a {months}-month warranty. [Bought|Delivered] "
        "on {placed}, it is covered [until|up to] {end}[ for manufacturing defects|].",
        rng, {"name": product.name, "months": months, "placed": fmt_date(placed), "end": fmt_date(end)})


def _international_example(rng: random.Random, world: w.World) -> str:
    country = pick(rng, tuple(w.INTERNATIONAL))
    lo, hi, fee = w.INTERNATIONAL[country]
    product, placed, name, _ = _example_order(rng, world)
    dispatch = add_business_days(placed, 1)
    return sentence(
        "[For example|Example]: {name} in {country} orders the {product} on {placed}. Shipping to {country} costs "
        "a flat {fee}, the parcel leaves on {dispatch} and [arrives|is delivered] between {d1} and {d2}; import "
        "duties, if any, are [collected|charged] by the carrier on delivery.",
        rng, {"name": name, "country": country, "product": product.name, "placed": fmt_date(placed),
              "fee": fmt_money(fee), "dispatch": fmt_date(dispatch), "d1": fmt_date(add_business_days(dispatch, lo)),
              "d2": fmt_date(add_business_days(dispatch, hi))})


def _loyalty_example(rng: random.Random, world: w.World) -> str:
    tier = pick(rng, w.LOYALTY_TIERS)
    spend = rng.randint(30, 400) + 0.99
    points = int(spend) * w.POINTS_PER_DOLLAR[tier]
    return sentence(
        "[For example|Example]: a {tier} member who spends {spend} earns {points} points, which is worth "
        "{value} off a later order.",
        rng, {"tier": tier, "spend": fmt_money(spend), "points": f"{points:,}",
              "value": fmt_money(points / w.POINTS_PER_REWARD_DOLLAR)})


def _price_example(rng: random.Random, world: w.World) -> str:
    product, placed, name, _ = _example_order(rng, world)
    drop = round(product.price * rng.choice((0.1, 0.15, 0.2, 0.25)), 2)
    day = placed + dt.timedelta(days=rng.randint(2, w.PRICE_ADJUST_DAYS))
    return sentence(
        "[For example|Say] {name} buys the {product} for {price} on {placed} and the price drops by {drop} on "
        "{day}. That is within {days} days, so we refund the {drop} difference to the original payment method.",
        rng, {"name": name, "product": product.name, "price": fmt_money(product.price), "placed": fmt_date(placed),
              "drop": fmt_money(drop), "day": fmt_date(day), "days": w.PRICE_ADJUST_DAYS})


def _sizing_example(rng: random.Random, world: w.World) -> str:
    size = pick(rng, tuple(SIZE_CHART))
    lo, hi = SIZE_CHART[size]
    chest = rng.randint(lo, hi)
    return sentence(
        "[For example|Example]: with a chest measurement of {chest} cm, size {size} ({lo} to {hi} cm) is the one "
        "to [choose|pick][; if you like a looser fit, go one size up|].",
        rng, {"chest": chest, "size": size, "lo": lo, "hi": hi})


SIZE_CHART = {"XS": (81, 86), "S": (87, 94), "M": (95, 102), "L": (103, 110), "XL": (111, 118), "XXL": (119, 128)}
SHOE_CHART = {"6": 23.5, "7": 24.4, "8": 25.2, "9": 26.0, "10": 26.8, "11": 27.6, "12": 28.4}


# --------------------------------------------------------------------------- topics

TOPICS: tuple[Topic, ...] = (
    Topic(
        "shipping",
        ("[Shipping|Delivery] [options|methods] and [costs|prices]", "How [shipping|delivery] works at {shop}",
         "[Delivery times|How long delivery takes] and [shipping costs|what shipping costs]",
         "[Everything you need to know|A short guide] about [shipping|delivery]", "Shipping [FAQ|questions answered]",
         "[Choosing|How to choose] a [shipping|delivery] method"),
        ("We [ship|deliver] to every address in the [United States|US] with three methods: economy, standard and "
         "express.",
         "[This article|This page|This guide] explains [how we ship your order|our shipping options], [what they "
         "cost|their cost] and [how long delivery takes|when to expect your parcel].",
         "[Most|Nearly all] orders leave our warehouse within one business day, so delivery time [mostly|largely] "
         "depends on the method you [choose|pick] at checkout.",
         "[Wondering|Not sure] which delivery option to [pick|choose]? [Here is|This is] [how they compare|what each "
         "one costs and how fast it is]."),
        (
            Section(("[Shipping methods|Delivery options] and [costs|prices]", "What [shipping|delivery] costs",
                     "Our [three|] shipping [speeds|methods]"),
                    ("Economy shipping costs {eco_cost} and [takes|arrives in] {eco_min} to {eco_max} business days.",
                     "Standard shipping costs {sta_cost} and [takes|usually arrives in] {sta_min} to {sta_max} "
                     "business days.",
                     "Express shipping costs {exp_cost} and [arrives|is delivered] in {exp_min} to {exp_max} "
                     "business days.",
                     "Orders [over|above] {free_over} ship [free|for free] with economy or standard shipping.",
                     "[Silver and Gold members|Members of our Silver and Gold tiers] get free standard shipping on "
                     "every order[, whatever the total|, with no minimum|].",
                     "Gold members also get express shipping [free of charge|at no cost].",
                     "The [shipping cost|delivery fee] [is shown|appears] at checkout before you pay[, so there are "
                     "no surprises|].",
                     "Delivery times are counted in business days, Monday to Friday, [and do not include|not "
                     "counting] weekends [or|and] public holidays."),
                    ("Economy: {eco_cost}, {eco_min} to {eco_max} business days",
                     "Standard: {sta_cost}, {sta_min} to {sta_max} business days",
                     "Express: {exp_cost}, {exp_min} to {exp_max} business days",
                     "Free economy and standard shipping on orders over {free_over}",
                     "Free standard shipping for Silver and Gold members")),
            Section(("When [your order ships|we dispatch your order]", "[Dispatch|Processing] times",
                     "From checkout to [your door|your doorstep]"),
                    ("[Most|Almost all] orders leave our warehouse within one business day[ of being placed|].",
                     "Orders placed on a weekend are packed [on Monday|the next business day].",
                     "As soon as your parcel [leaves the warehouse|is handed to the carrier], [we email you|you get "
                     "an email with] the tracking number[ and a link to the carrier's website|].",
                     "[From that moment|Once it has left], your order page shows the status shipped, [with|together "
                     "with] the carrier and the tracking number.",
                     "[Large orders|Orders with bulky items] [may|can] arrive in [several parcels|more than one parcel], "
                     "each with its own tracking number.",
                     "On the day of delivery the status changes to out for delivery[, and most carriers send a "
                     "delivery window by text|]."),
                    ("You place the order and get a confirmation email",
                     "We pack it, usually within one business day",
                     "The carrier picks it up and you get the tracking number",
                     "The carrier delivers it and the status changes to delivered"), True),
            Section(("[Our carriers|Who delivers your parcel]", "Carriers and tracking numbers",
                     "[Tracking|Following] your parcel"),
                    ("We work with {carriers}.",
                     "Tracking numbers from ParcelPoint start with PP and have 10 digits.",
                     "SwiftShip tracking numbers start with SS [followed by|and have] 12 digits.",
                     "NorthPost uses tracking numbers that start with NP and [have|are followed by] 9 digits.",
                     "Veloce Express tracking numbers start with VX and have 11 digits.",
                     "[Tracking can take|It can take] a few hours after dispatch before the carrier's website shows "
                     "the first scan.",
                     "You can [follow|track] every order from [your account page|Orders in your account] without "
                     "[typing|entering] the tracking number.")),
            Section(("[Late|Delayed] [parcels|deliveries]", "When a parcel is late", "[Lost|Missing] parcels"),
                    ("If your parcel [has not arrived|is still missing] {trace_days} business days after the "
                     "estimated date, [contact us|get in touch] and we open a trace with the carrier.",
                     "If the carrier cannot find it within {lost_days} business days, we [send a replacement|ship "
                     "a new one] or refund you, whichever you prefer.",
                     "[Bad weather|Peak season] can add a day or two to delivery times, [especially|mostly] in "
                     "December.",
                     "A parcel that is past its estimated date shows the status delayed on your order page.",
                     "[Check|Look] around your door, with neighbours and in your mailbox first: carriers [sometimes|"
                     "often] leave parcels in a safe place.")),
        ),
        (("Do you deliver on weekends?", "[Some carriers deliver on Saturdays|Saturday delivery depends on the "
          "carrier], but delivery estimates only count business days, Monday to Friday."),
         ("How much is shipping?", "Economy costs {eco_cost}, standard {sta_cost} and express {exp_cost}. "
          "Economy and standard are free on orders over {free_over}."),
         ("When do I get my tracking number?", "[As soon as|The moment] the parcel leaves our warehouse; "
          "[we email it to you|it is emailed to you] and it [is also on|appears on] your order page."),
         ("Can I choose the carrier?", "No, we [pick|choose] the carrier [for each parcel|per parcel] based on "
          "the address and the [size|weight] of the parcel."),
         ("My parcel is late. What should I do?", "Wait {trace_days} business days past the estimate, then contact "
          "us and we will open a trace with the carrier."),
         ("Is express shipping ever free?", "Yes, for Gold members. Everyone else pays {exp_cost}."),
         ("Do you ship to P.O. boxes?", "[Yes,|We do:] economy and standard parcels can go to P.O. boxes; express "
          "parcels need a street address."),
         ("Can I change the delivery address after ordering?", "[Yes,|You can] {cancel_window}. Once the order has "
          "left, [ask the carrier to redirect it|the carrier may be able to redirect it].")),
        _shipping_example,
    ),
    Topic(
        "returns",
        ("[Returns|Returning an item] and [exchanges|exchanging an item]", "Our [return|returns] policy",
         "How to return [an item|something you bought]", "[Returns|Return policy] in {return_days} days",
         "[Changed your mind|Not quite right]? [How to|Here is how to] return it", "Returns made [easy|simple]"),
        ("You can return most items within {return_days} days of delivery[ for a full refund|].",
         "[Not happy with|Changed your mind about] [an item|a purchase]? [This page|This article] explains how "
         "returns and exchanges work.",
         "Returns are free within the [United States|US]: we [email you|send you] a prepaid label and refund you "
         "once the item is back.",
         "[Every|Each] return starts from your order page and takes [about two minutes|a couple of minutes]."),
        (
            Section(("[What you can return|What can be returned]", "The return window", "[Return|Returns] rules"),
                    ("[Items|Most items] can be returned within {return_days} days of delivery.",
                     "Items must be unused, [unwashed|unworn] and [in their original packaging|with the original "
                     "tags attached].",
                     "We can't accept returns of {non_returnable}.",
                     "The {return_days} days start on the delivery date shown on your order page, not on the order "
                     "date.",
                     "A faulty item outside the return window [may still be|is often] covered by its warranty.",
                     "[Gifts|Items bought as gifts] can be returned by the recipient for a gift card[ for the same "
                     "amount|]."),
                    ("Unused and in the original packaging", "Within {return_days} days of delivery",
                     "Not a gift card, personalised or final sale item", "With the original tags attached")),
            Section(("How to [start|make] a return", "Returning an item step by step", "[Starting|Your] return"),
                    ("[Start|Open] the return from your order page and [pick|choose] the items and a reason.",
                     "[We email you|You get] a prepaid return label[ within minutes|]; print it or show the QR code "
                     "at a drop-off point.",
                     "Once the return is started, the order status changes to return requested.",
                     "Pack the item[ securely|], ideally in the box it came in, and drop it off within 14 days.",
                     "[Keep|Hold on to] the drop-off receipt until the refund arrives."),
                    ("Open Orders in your account and select the order", "Choose the items and tell us why",
                     "Print the prepaid label or save the QR code", "Drop the parcel off at any carrier location",
                     "Wait for the refund email"), True),
            Section(("Exchanges", "[Swapping|Exchanging] for another size or colour", "Exchanging an item"),
                    ("Exchanges for another size or colour of the same product are free.",
                     "[Choose|Pick] exchange instead of refund when you start the return, and we ship the new item "
                     "as soon as the old one is [scanned|picked up] by the carrier.",
                     "If the size you want is out of stock, we refund you instead.",
                     "For a different product, return the item for a refund and place a new order.")),
            Section(("Refunds for returns", "When you get your money back", "[After|Once] we receive your return"),
                    ("We check returns within two business days of receiving them.",
                     "Refunds go to the original payment method and [take|usually take] {refund_days} to appear.",
                     "Return shipping is free in the [United States|US]; [the original shipping cost is not "
                     "refunded|we do not refund the original shipping cost] unless the item was faulty.",
                     "When the refund is issued, the order status changes to refunded and we [email you|send you an "
                     "email].")),
        ),
        (("How long do I have to return something?", "{return_days} days from the delivery date."),
         ("Are returns free?", "Yes, within the [United States|US]. International returns are sent back at your own "
          "cost."),
         ("Can I return a gift card?", "No, gift cards can't be returned or exchanged for cash."),
         ("I lost the original packaging. Can I still return the item?", "[Yes,|Usually, yes:] any sturdy box "
          "will do, as long as the item itself is unused."),
         ("Can I return worn shoes?", "Only if they have been tried on indoors and show no signs of wear."),
         ("When will I get my refund?", "We issue it within two business days of receiving the return; your bank "
          "then takes {refund_days}."),
         ("Can I exchange for a different size?", "Yes, exchanges for another size or colour of the same product "
          "are free.")),
        _returns_example,
    ),
    Topic(
        "refunds",
        ("[Refunds|Refund times] explained", "When will I get my refund?", "[How|How and when] refunds work",
         "[Your refund|Refunds]: timing and payment methods", "[Tracking|Checking] a refund"),
        ("Refunds always go back to the payment method you used for the order.",
         "[This article|This page] explains when refunds are issued and how long they take to [reach you|reach "
         "your account].",
         "[Waiting for|Expecting] a refund? [Here is|This is] [what happens and when|the timeline]."),
        (
            Section(("When we issue a refund", "[What triggers|When you get] a refund", "Refund triggers"),
                    ("We issue a refund when a returned item [reaches|arrives at] our warehouse and passes a quick "
                     "check.",
                     "A cancelled order is refunded [right away|immediately], [usually|often] within an hour.",
                     "[For|With] a damaged or wrong item, we refund you as soon as you send photos[; there is no "
                     "need to return it|].",
                     "If a parcel is lost, we refund you after the carrier trace, {lost_days} business days at "
                     "most.",
                     "If a price drops within {price_days} days of your purchase, we refund the difference once.")),
            Section(("How long refunds take", "Refund [times|timing] by payment method",
                     "[When|How soon] the money arrives"),
                    ("Card refunds take {refund_days} to show up on your statement[, depending on your bank|].",
                     "PayPal refunds [usually|normally] arrive within one business day.",
                     "Refunds to a gift card [are instant|arrive straight away]; the gift card keeps its original "
                     "expiry date.",
                     "Apple Pay refunds follow the card behind it and take {refund_days}.",
                     "Once a refund is issued, your order page shows the status refunded and the refund date."),
                    ("Cards: {refund_days}", "PayPal: within one business day", "Gift cards: instantly",
                     "Apple Pay: {refund_days}, like the card behind it")),
            Section(("Refund [not there yet|still missing]?", "If you can't see your refund",
                     "[Missing|Late] refunds"),
                    ("Check the refund date on your order page first: the bank's {refund_days} start on that date.",
                     "Some banks show a refund as a pending credit[ for a few days|] before it appears as a "
                     "transaction.",
                     "If {refund_days} have passed since the refund date, [contact us|get in touch] and we send "
                     "you the refund reference to give to your bank.",
                     "We can't speed up a refund once it is issued; the timing is up to your bank.")),
        ),
        (("How long does a refund take?", "{refund_days} for cards after we issue it; PayPal is usually faster."),
         ("Can I get the refund on a different card?", "No, refunds always go to the original payment method."),
         ("Is shipping refunded?", "[Only|The original shipping cost is refunded only] when the item was faulty, "
          "damaged or wrong."),
         ("I cancelled my order. When do I get my money?", "Cancelled orders are refunded right away; your bank "
          "takes {refund_days} to show it."),
         ("Do you refund price drops?", "Yes, once per order, when the price drops within {price_days} days of "
          "your purchase.")),
        _refund_example,
    ),
    Topic(
        "warranty",
        ("[Warranty|Product warranty] [cover|coverage] and claims", "How to make a warranty claim",
         "[Our|The {shop}] warranty[ explained|]", "What [the|our] warranty covers"),
        ("Every product we sell comes with a warranty against manufacturing defects.",
         "[The warranty period|How long the warranty lasts] [depends on the product|varies by product] and is "
         "listed on [each|every] product page.",
         "[Something broke|A product stopped working]? [This article explains|Here we explain] what the warranty "
         "covers and how to claim."),
        (
            Section(("[What is covered|Coverage]", "What the warranty covers", "[Covered|What counts as a defect]"),
                    ("The warranty covers defects in materials and workmanship[ under normal use|].",
                     "Warranty periods run from 6 to 60 months and start on the delivery date.",
                     "[Zips|Zippers], seams, soles, hinges, batteries and electronics are covered when they fail "
                     "under normal use.",
                     "[The warranty is|Warranties are] [not transferable|tied to the original order]; a gift "
                     "recipient can claim with the gift receipt."),
                    ("A seam that comes apart", "A zip that stops closing", "A battery that no longer charges",
                     "A handle that comes loose", "A sole that separates from the upper")),
            Section(("What is not covered", "[Exclusions|Not covered]", "[Limits|Limitations] of the warranty"),
                    ("Normal wear and tear, [such as|like] pilling or faded colours, is not a defect.",
                     "Accidental damage, [misuse|improper use] and repairs by someone else are not covered.",
                     "[Damage from|Ignoring] the care instructions[, such as machine-washing a hand-wash item,|] is "
                     "not covered.",
                     "Consumables like filters and [replacement|spare] tips are not covered.")),
            Section(("How to claim", "Making a [claim|warranty claim]", "[Claiming|The claim process]"),
                    ("Send us your order number, a short description of the problem and a photo or video[ of the "
                     "defect|].",
                     "We reply within two business days with a repair, a replacement or a refund.",
                     "If the product is no longer sold, we offer a similar product or a refund of the price paid.",
                     "You never pay shipping for a warranty claim."),
                    ("Find your order number in your account", "Take a clear photo of the defect",
                     "Start a claim from the order page or email {email}", "We reply within two business days"),
                    True),
        ),
        (("How long is the warranty?", "It depends on the product, from 6 to 60 months; the product page lists "
          "it."),
         ("Does the warranty cover accidents?", "No, only manufacturing defects under normal use."),
         ("Do I need the receipt?", "Your order number is enough; gift recipients can use the gift receipt."),
         ("Who pays shipping for a warranty repair?", "We do, both ways."),
         ("Can I get a refund instead of a repair?", "If a repair or replacement isn't possible, yes.")),
        _warranty_example,
    ),
    Topic(
        "account",
        ("[Your account|Managing your account]", "[Signing in|Sign-in] and password help",
         "[Account|Login] [security|problems]", "[Can't|Unable to] sign in? Start here",
         "[Changing|Updating] your email, password or address"),
        ("Your {shop} account keeps your orders, addresses, payment methods and loyalty points in one place.",
         "[This article|This page] [covers|explains] signing in, resetting your password and keeping your account "
         "secure.",
         "[Most|Nearly all] sign-in problems [are solved|can be fixed] in a minute with a password reset."),
        (
            Section(("Resetting your password", "Forgot your password?", "[New|A new] password"),
                    ("Select Forgot password on the sign-in page and enter the email address of your account.",
                     "We email you a reset link that [works for|is valid for] {reset_minutes} minutes.",
                     "If the email doesn't arrive within a few minutes, check your spam folder[ and promotions "
                     "tab|].",
                     "[Choose|Pick] a password of at least 10 characters that you don't use anywhere else.",
                     "For your security, resetting the password signs you out on every device."),
                    ("Go to the sign-in page and select Forgot password", "Enter your account email",
                     "Open the link we email you within {reset_minutes} minutes", "Choose a new password"), True),
            Section(("Two-step verification", "Turning on two-step verification", "[Extra|More] security"),
                    ("Two-step verification asks for a code from an authenticator app or a text message when you "
                     "sign in on a new device.",
                     "You can turn it on [under|in] Security in your account settings.",
                     "[Keep|Store] your backup codes somewhere safe; [each|every] code works once.",
                     "If you lose your phone, use a backup code or contact us to verify your identity.")),
            Section(("Changing your email address", "[Updating|Changing] your details", "Your personal details"),
                    ("You can change your email address in your account settings; we send a confirmation link to "
                     "the new address.",
                     "Until you confirm it, we keep using the old address[ for order emails|].",
                     "Addresses and phone numbers can be changed [at any time|any time]; orders already "
                     "[on their way|dispatched] keep the old address.",
                     "We never ask for your password by email, phone or chat.")),
            Section(("[Closing|Deleting] your account", "Your data", "[Privacy|Data] requests"),
                    ("You can [download|export] a copy of your data or delete your account from the Privacy page.",
                     "[Deleting|Closing] your account removes your addresses and saved cards; we keep order records "
                     "for seven years because tax law requires it.",
                     "Unused loyalty points are lost when an account is deleted.",
                     "Emails claiming to be from {shop} that ask for your password or card number are phishing; "
                     "forward them to {email}.")),
        ),
        (("I didn't get the password reset email.", "Check spam, then request a new link; each link works for "
          "{reset_minutes} minutes."),
         ("Can I have two accounts with one email?", "No, each email address belongs to one account."),
         ("How do I turn on two-step verification?", "Open Security in your account settings and follow the "
          "steps."),
         ("Will support ever ask for my password?", "Never. [Don't share it with anyone|Keep it to yourself], "
          "including us."),
         ("How do I delete my account?", "From the Privacy page in your account settings."),
         ("Why was I signed out everywhere?", "A password reset signs you out on every device, for your "
          "security.")),
        None,
    ),
    Topic(
        "payments",
        ("Payment methods[ we accept|]", "[Paying|How to pay] for your order", "[Payment|Billing] questions",
         "[Charges|Card charges] and payment problems", "When [is my card|am I] charged?"),
        ("We accept {payment_methods}.",
         "[This article|This page] explains [when we charge you|when your card is charged], what a pending charge "
         "is and what to do when a payment fails.",
         "[Paying|Checkout] [is secure|is encrypted]: we never see or store your full card number."),
        (
            Section(("Accepted payment methods", "How you can pay", "[Ways|Options] to pay"),
                    ("We accept {payment_methods}.",
                     "You can pay with one gift card and [a card|one other payment method] on the same order.",
                     "[Prices|All prices] are in US dollars and include no hidden fees.",
                     "Prices [include|already include] sales tax, so the total is the item prices plus "
                     "shipping."),
                    ("Visa, Mastercard, American Express and Discover", "PayPal", "Apple Pay",
                     "{shop} gift cards")),
            Section(("When you are charged", "[Authorisations|Pending charges]", "Pending and final charges"),
                    ("When you place an order we [place|put] an authorisation on your card; the charge [becomes "
                     "final|is taken] when the order ships.",
                     "If you cancel before dispatch, the authorisation [disappears|is released] within "
                     "{auth_days}.",
                     "A second pending charge for the same amount is usually an authorisation [that was retried|"
                     "from a retried payment] and drops off within {auth_days}.",
                     "If an order ships in several parcels, you may see one charge per parcel.")),
            Section(("If your payment fails", "Declined payments", "[Payment|Card] [declined|problems]"),
                    ("If a payment is declined, the order goes on hold and we email you a link to update the "
                     "payment.",
                     "[An order on hold waits seven days for new payment details before it is cancelled|Orders on "
                     "hold wait seven days for new payment details; after that they are cancelled].",
                     "Payments are often declined because of a billing address that doesn't match the card, an "
                     "expired card or the bank's fraud checks.",
                     "[Your bank|The bank] can tell you why a payment was declined; we are not told the reason.")),
        ),
        (("When is my card charged?", "When the order ships; until then, it is an authorisation."),
         ("I see two charges for one order.", "One of them is usually an authorisation that drops off within "
          "{auth_days}."),
         ("Why is my order on hold?", "The payment did not go through; update it from the link in our email."),
         ("Can I pay in instalments?", "Not at the moment."),
         ("Can I use two gift cards on one order?", "You can use one gift card per order, together with one other "
          "payment method.")),
        None,
    ),
    Topic(
        "gift_cards",
        ("Gift cards", "[Buying|Sending] a gift card", "[Using|Redeeming] a gift card", "Gift card [FAQ|questions]"),
        ("{shop} gift cards come in values from {gift_min} to {gift_max} and are valid for {gift_years} years.",
         "A gift card is [the easiest|an easy] present when you're not sure about sizes or colours.",
         "[This article|This page] explains how to buy, send, use and check a gift card."),
        (
            Section(("Buying a gift card", "[Sending|Giving] a gift card", "Gift card values"),
                    ("Gift cards come in values of $10, $25, $50, $75, $100, $150, $200, $250 and $500.",
                     "Digital gift cards are emailed [on the date you choose|straight away or on a date you "
                     "choose], with your message.",
                     "Printed gift cards ship free with standard shipping.",
                     "Gift cards can't be bought with another gift card.")),
            Section(("Using a gift card", "[Redeeming|Spending] a gift card", "At checkout"),
                    ("Enter the 16-character code at checkout; the balance is taken off the total.",
                     "If the order costs more than the balance, pay the rest with a card or PayPal.",
                     "Unused balance stays on the card for later orders.",
                     "Gift cards are valid for {gift_years} years from the date of purchase.",
                     "Gift cards can't be exchanged for cash [or returned|and can't be returned].")),
            Section(("Checking your balance", "Lost or stolen gift cards", "[Balance|Balances] and expiry"),
                    ("You can check the balance [on the Gift cards page|from the Gift cards page] with the code.",
                     "A lost digital gift card can be re-sent to the original recipient address.",
                     "We can't replace a printed card [that was lost|once it is lost] unless you have the code.",
                     "Refunds for orders paid with a gift card go back to the same gift card.")),
        ),
        (("Do gift cards expire?", "Yes, {gift_years} years after purchase."),
         ("Can I get cash for a gift card?", "No, gift cards can't be exchanged for cash."),
         ("Can I return a gift card?", "No, gift cards are not returnable."),
         ("What values are available?", "From {gift_min} to {gift_max}."),
         ("I returned something I paid for with a gift card.", "The refund goes back to the gift card.")),
        None,
    ),
    Topic(
        "international",
        ("International [shipping|delivery]", "Shipping [outside|abroad from] the [US|United States]",
         "[Ordering|Shopping] from [abroad|outside the US]", "International orders, duties and returns"),
        ("We ship to Canada, Mexico, the United Kingdom, Ireland, Germany, France, Spain, Australia, Japan and New "
         "Zealand.",
         "International orders [pay|have] a flat shipping fee that depends on the country.",
         "[This page|This article] lists international delivery times and fees and explains duties and returns."),
        (
            Section(("Delivery times and fees", "[Fees|Costs] by country", "Where we ship"),
                    ("Canada: {ca}.", "Mexico: {mx}.", "The United Kingdom and Ireland: {uk}.",
                     "Germany and France: {de}.", "Spain: {es}.", "Australia and Japan: {au}.",
                     "New Zealand: {nz}.",
                     "The free shipping threshold and tier shipping perks apply to [US|domestic] orders only.")),
            Section(("Duties and taxes", "Customs", "[Import|Customs] duties"),
                    ("Import duties and taxes, if any, are collected by the carrier on delivery.",
                     "[Prices|Our prices] do not include [import|customs] duties.",
                     "A parcel held at customs [may|can] take a few extra days.",
                     "If you refuse a parcel because of duties, we refund the items but not the shipping fee.")),
            Section(("International returns", "Returning from abroad", "Returns [outside|from outside] the US"),
                    ("International customers have the same {return_days} days to return items.",
                     "Return shipping from abroad is at your own cost; use a tracked service.",
                     "We refund the items once they arrive[, usually within two business days|]; duties are not "
                     "refunded by us.")),
        ),
        (("Do you ship to my country?", "We ship to the ten countries listed on this page."),
         ("Who pays customs duties?", "The recipient, to the carrier on delivery."),
         ("Is shipping ever free abroad?", "No, international orders always pay the flat fee."),
         ("Can I return an international order?", "Yes, within {return_days} days, at your own shipping cost.")),
        _international_example,
    ),
    Topic(
        "loyalty",
        ("[Our|The {shop}] loyalty programme", "Loyalty tiers and points", "[Earning|How to earn] and [using|"
         "spending] points", "Bronze, Silver and Gold: what you get"),
        ("Every account is part of our loyalty programme, with three tiers: Bronze, Silver and Gold.",
         "You earn points on every order and [spend|use] them as money off later orders.",
         "[This article|This page] explains [the tiers|how tiers work], how points are earned and what they are "
         "worth."),
        (
            Section(("The tiers", "Bronze, Silver and Gold", "How tiers work"),
                    ("Everyone starts at Bronze and earns {bronze_points} point per dollar spent.",
                     "Spend {silver_spend} in a calendar year to reach Silver: {silver_points} points per dollar "
                     "and free standard shipping on every order.",
                     "Spend {gold_spend} in a calendar year to reach Gold: {gold_points} points per dollar, free "
                     "standard shipping and free express shipping.",
                     "Your tier lasts until the end of the following calendar year."),
                    ("Bronze: {bronze_points} point per dollar",
                     "Silver (from {silver_spend} a year): {silver_points} points per dollar, free standard "
                     "shipping",
                     "Gold (from {gold_spend} a year): {gold_points} points per dollar, free standard and express "
                     "shipping")),
            Section(("Points", "[Using|Spending] your points", "What points are worth"),
                    ("{reward_points} points [are worth|equal] $1 off [an order|a later order].",
                     "Points are added when an order ships and removed again if it is returned.",
                     "Points [expire|run out] 24 months after you earn them.",
                     "You can use points together with a gift card or any payment method.")),
        ),
        (("How do I join?", "You're already in: every account is part of the programme."),
         ("What are points worth?", "{reward_points} points equal $1 off."),
         ("Do points expire?", "Yes, 24 months after you earn them."),
         ("How do I reach Gold?", "Spend {gold_spend} in a calendar year."),
         ("Does Silver get free shipping?", "Yes, free standard shipping on every order.")),
        _loyalty_example,
    ),
    Topic(
        "order_changes",
        ("[Changing|Cancelling] an order", "[Cancel|Change] your order", "Cancellations and order changes",
         "[Made a mistake|Ordered the wrong thing]? [How to|Here is how to] change an order"),
        ("You can change or cancel an order {cancel_window}.",
         "[This article|This page] explains what you can still change after ordering, and how.",
         "[Most|Many] orders leave the warehouse within a day, so [act quickly|the sooner you ask, the better]."),
        (
            Section(("Cancelling an order", "How to cancel", "Cancellations"),
                    ("You can cancel an order while its status is processing.",
                     "Open the order page and select Cancel order; the refund is issued [right away|immediately].",
                     "Once the status is shipped, the order can't be cancelled, but you can return it for free "
                     "after delivery.",
                     "Cancelled orders [show the status|are marked] cancelled on the order page.")),
            Section(("Changing the address or items", "Changing an order", "[Edits|Changes] after ordering"),
                    ("You can change the delivery address, the shipping method or the items while the order is "
                     "processing.",
                     "[After dispatch|Once dispatched], only the carrier can redirect a parcel; use the link in your "
                     "shipping email.",
                     "To add an item, place a new order; [we can't merge orders|orders can't be merged].",
                     "Changing the shipping method updates the price [at once|straight away].")),
            Section(("Order statuses", "What your order status means", "[Understanding|Reading] order statuses"),
                    ("Processing means {m_processing}.", "On hold means {m_hold}.", "Shipped means {m_shipped}.",
                     "Out for delivery means {m_ofd}.", "Delayed means {m_delayed}.",
                     "Delivered means {m_delivered}.", "Cancelled means {m_cancelled}.",
                     "Return requested means {m_return}.", "Refunded means {m_refunded}.")),
        ),
        (("Can I cancel my order?", "Yes, while its status is processing."),
         ("My order has shipped. Can I still cancel it?", "No, but you can return it for free once it arrives."),
         ("Can I change the address?", "Yes, {cancel_window}."),
         ("Can I add something to my order?", "No, please place a new order."),
         ("What does on hold mean?", "The payment didn't go through; update it from the link in our email.")),
        None,
    ),
    Topic(
        "damaged_items",
        ("Damaged, faulty or wrong items", "[Received|Got] a damaged item?", "[Wrong|Missing] items",
         "Problems with [a delivery|your delivery]"),
        ("We're sorry if something arrived damaged or wrong; [it's quick to fix|we fix it quickly].",
         "Report damaged, faulty or wrong items within {damage_days} days of delivery.",
         "[This article|This page] explains what to do when [a parcel|an order] arrives damaged, incomplete or "
         "wrong."),
        (
            Section(("Damaged or faulty items", "[If|When] something arrives broken", "Damaged parcels"),
                    ("Take a photo of the item and the box, then contact us within {damage_days} days of delivery.",
                     "We send a replacement or refund you in full, including shipping[; you choose|].",
                     "You don't need to send a damaged item back unless we ask[ for it|].",
                     "If the box is badly damaged when the carrier arrives, you can refuse the parcel.")),
            Section(("Wrong or missing items", "[Received|Got] the wrong item", "Something is missing"),
                    ("[Check|Look at] the packing slip: large orders can arrive in [several|two or more] "
                     "parcels.",
                     "If you received the wrong item, we send the right one and a free return label for the wrong "
                     "one.",
                     "If an item is missing, we check the packing weight and send it again[ straight away|].",
                     "Parcels marked delivered that you can't find: check with neighbours, then contact us within "
                     "{damage_days} days.")),
        ),
        (("How long do I have to report damage?", "{damage_days} days from delivery."),
         ("Do I have to send the damaged item back?", "Only if we ask for it."),
         ("Do I get a refund or a replacement?", "You choose."),
         ("My parcel says delivered but it isn't here.", "Check around your door and with neighbours, then "
          "contact us.")),
        None,
    ),
    Topic(
        "price_promotions",
        ("Price adjustments and promotions", "[Discount|Promo] codes", "[Sales|Promotions] and price drops"),
        ("[Prices change|Prices sometimes drop]; if one drops within {price_days} days of your purchase, we refund "
         "the difference once.",
         "[This article|This page] explains promo codes, sales and price adjustments."),
        (
            Section(("Price adjustments", "If the price drops", "[Price|Price drop] protection"),
                    ("If an item's price drops within {price_days} days of your purchase, we refund the difference "
                     "once per order.",
                     "Ask for a price adjustment from the order page or by email.",
                     "Price adjustments don't apply to final sale items or to prices at other shops.")),
            Section(("Promo codes", "Using a [discount|promo] code", "Discount codes"),
                    ("Enter the promo code [at checkout|on the checkout page]; one code per order.",
                     "Promo codes can't be added to an order after it is placed.",
                     "[Codes|A code] can't be used on gift cards.",
                     "[Codes|Promo codes] have an end date; the code's terms are in the email that sent it.")),
        ),
        (("Can I use two promo codes?", "No, one code per order."),
         ("The price dropped after I bought it.", "Within {price_days} days we refund the difference once."),
         ("Do you match other shops' prices?", "No, price adjustments only cover our own prices.")),
        _price_example,
    ),
    Topic(
        "sizing",
        ("Size guide", "[Finding|How to find] your size", "[Sizing|Size] charts for clothing and shoes"),
        ("[Measure|Take] your chest and [foot length|feet] and compare [them|the numbers] with the charts below.",
         "[Not sure|Unsure] about sizes? Exchanges for another size are free.",
         "Our clothing runs true to size unless the product page says otherwise."),
        (
            Section(("Clothing sizes", "Tops, knitwear and jackets", "Apparel size chart"),
                    ("Measure around the fullest part of your chest, under your arms.",
                     "If you are between two sizes, [take|choose] the larger one for jackets and the smaller one "
                     "for knitwear.",
                     "Relaxed-fit products are cut [roomier|looser]; the product page says so."),
                    ("XS: chest 81 to 86 cm", "S: chest 87 to 94 cm", "M: chest 95 to 102 cm",
                     "L: chest 103 to 110 cm", "XL: chest 111 to 118 cm", "XXL: chest 119 to 128 cm")),
            Section(("Shoe sizes", "Footwear sizes", "Finding your shoe size"),
                    ("Stand on a sheet of paper, mark your heel and longest toe and measure the distance.",
                     "Our shoes use US sizes from 6 to 12.",
                     "Hiking boots are best tried with the socks you will wear with them."),
                    ("6: foot length 23.5 cm", "7: 24.4 cm", "8: 25.2 cm", "9: 26 cm", "10: 26.8 cm",
                     "11: 27.6 cm", "12: 28.4 cm")),
        ),
        (("What if it doesn't fit?", "Exchanges for another size are free within {return_days} days."),
         ("Do your sizes run small?", "No, they are true to size unless the product page says otherwise."),
         ("Are shoe sizes US or EU?", "US sizes, from 6 to 12.")),
        _sizing_example,
    ),
    Topic(
        "contact",
        ("Contact us", "[How to|Ways to] reach our support team", "Customer support [hours|options]"),
        ("Our support team is available {hours}.",
         "You can reach us by phone, email or chat; [this page explains|here we explain] which is quickest."),
        (
            Section(("Phone, email and chat", "[Ways|How] to contact us", "Support channels"),
                    ("Call us on {phone} {hours}.", "Email {email}; we reply within {reply_hours} hours.",
                     "The chat [on our website|in your account] is answered {hours}.",
                     "Outside those hours, leave a message and we [reply|answer] the next business day.")),
            Section(("Before you contact us", "[Help us|So we can] help you faster", "What to have ready"),
                    ("Have your order number ready; it starts with SW- and [is in|appears in] your confirmation "
                     "email.",
                     "For damaged or faulty items, [attach|include] a photo.",
                     "For your security, we may ask you to confirm your email address or postcode[ before we "
                     "change anything|].",
                     "We never ask for your password or your full card number.")),
        ),
        (("When is support open?", "{hours}."), ("What is the support email?", "{email}."),
         ("How fast do you answer emails?", "Within {reply_hours} hours.")),
        None,
    ),
)
TOPIC_BY_KEY = {t.key: t for t in TOPICS}

# International lines are computed from the table once.
for _name, _key in (("Canada", "ca"), ("Mexico", "mx"), ("the United Kingdom", "uk"), ("Germany", "de"),
                    ("Spain", "es"), ("Australia", "au"), ("New Zealand", "nz")):
    _lo, _hi, _fee = w.INTERNATIONAL[_name]
    POLICY_VALUES[_key] = f"{fmt_money(_fee)}, {_lo} to {_hi} business days"
for _status, _meaning in w.STATUS_MEANINGS.items():
    _short = {"processing": "processing", "on hold": "hold", "shipped": "shipped", "out for delivery": "ofd",
              "delayed": "delayed", "delivered": "delivered", "cancelled": "cancelled", "return requested": "return",
              "refunded": "refunded"}[_status]
    POLICY_VALUES[f"m_{_short}"] = _meaning


# --------------------------------------------------------------------------- layout

STYLES = ("article", "article", "article", "faq", "guide", "policy")


def _values(rng: random.Random, topic: Topic) -> dict[str, Any]:
    values = dict(POLICY_VALUES)
    updated = dt.date(2023, 1, 1) + dt.timedelta(days=rng.randrange(700))
    values["updated"] = fmt_date(updated)
    others = [t for t in TOPICS if t.key != topic.key]
    values["related"] = ", ".join(expand(pick(rng, t.titles), rng, values) for t in rng.sample(others, 3))
    return values


def _sections(rng: random.Random, sections: list[Section], values: dict[str, Any], lo: int, hi: int) -> list[str]:
    parts = []
    chosen = sorted(rng.sample(range(len(sections)), rng.randint(min(lo, len(sections)), min(hi, len(sections)))))
    for i in chosen:
        sec = sections[i]
        body = [f"## {expand(pick(rng, sec.headings), rng, values)}",
                paragraph(rng, sec.sentences, rng.randint(2, min(5, len(sec.sentences))), values)]
        if sec.bullets and rng.random() < 0.7:
            if sec.steps:  # steps keep their order and are all needed
                body.append(numbered_list([sentence(t, rng, values) for t in sec.bullets]))
            else:
                k = rng.randint(min(3, len(sec.bullets)), len(sec.bullets))
                body.append(bullet_list(sample_lines(rng, sec.bullets, k, values), rng))
        if rng.random() < 0.4 and len(sec.sentences) > 4:
            body.append(paragraph(rng, sec.sentences, 2, values))
        parts.append("\n\n".join(body))
    return parts


def _faq(rng: random.Random, topic: Topic, values: dict[str, Any], k: int, qa_style: str) -> str:
    pairs = rng.sample(topic.faqs, min(k, len(topic.faqs)))
    lines = []
    for q, a in pairs:
        q, a = sentence(q, rng, values), sentence(a, rng, values)
        lines.append(f"Q: {q}\nA: {a}" if qa_style == "qa" else f"**{q}**\n{a}")
    return "\n\n".join(lines)


def make_article(rng: random.Random, topic: Topic, world: w.World) -> str:
    """One help-centre page about ``topic``, in a randomly chosen layout."""
    values = _values(rng, topic)
    style = pick(rng, STYLES)
    title = sentence(pick(rng, topic.titles), rng, values)
    intro = paragraph(rng, topic.intros, rng.randint(1, 2), values)
    parts = [f"# {title}", intro]
    if style == "faq":
        parts.append(_faq(rng, topic, values, rng.randint(4, 8), pick(rng, ("qa", "bold"))))
        parts.append(paragraph(rng, topic.sections[0].sentences, 3, values))
    elif style == "guide":
        steps = [s for s in topic.sections if s.steps] or list(topic.sections)
        sec = pick(rng, steps)
        lead = "[Here is how|Follow these steps|What to do]:" if sec.steps else "[In short|Key points|The short version]:"
        parts.append(sentence(lead, rng))
        parts.append(numbered_list([sentence(t, rng, values) for t in (sec.bullets or sec.sentences)]))
        if sec.bullets:  # without bullets the list already holds the section's sentences
            parts.append(paragraph(rng, sec.sentences, min(3, len(sec.sentences)), values))
        parts.extend(_sections(rng, [s for s in topic.sections if s is not sec], values, 1, 2))
    elif style == "policy":
        clauses = [t for sec in topic.sections for t in sec.sentences]
        picked = rng.sample(clauses, min(len(clauses), rng.randint(6, 10)))
        parts.append(sentence("[This policy|The following policy] applies to all orders placed [with|at] {shop}.",
                              rng, values))
        parts.append("\n".join(f"{i}. {sentence(t, rng, values)}" for i, t in enumerate(picked, start=1)))
    else:
        parts.extend(_sections(rng, list(topic.sections), values, 2, 4))
        if rng.random() < 0.7:
            parts.append(f"## {pick(rng, FAQ_HEADINGS)}")
            parts.append(_faq(rng, topic, values, rng.randint(2, 5), pick(rng, ("qa", "bold"))))
    if topic.example is not None and rng.random() < 0.8:
        parts.insert(rng.randint(2, len(parts)), topic.example(rng, world))
    parts.append(sentence(pick(rng, CLOSINGS), rng, values))
    if rng.random() < 0.6:
        parts.append(sentence(pick(rng, FOOTERS), rng, values))
    return "\n\n".join(parts)
