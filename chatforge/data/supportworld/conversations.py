"""Support conversations, intent labels, ranked candidate answers and preference pairs.

Each conversation: a customer (its split decides the conversation's split), an
intent, a record (customer + order, product or cart) rendered into the system
message, and a dialogue:

* the customer asks, with or without the order number;
* when the record holds several orders and the question names none, the agent
  asks which one, and the customer says;
* the agent answers from the record (``answers.answer``), which for every order
  intent states the order's status word for word;
* sometimes the customer follows up (thanks, or a policy question) and the agent
  replies.

Every conversation, and every candidate answer with its prompt, is at most
``MAX_CONVERSATION_CHARS`` long, so that the tiny preset's 512-token context holds it whole.

The candidate set for a conversation answers its main question (the prompt is
the dialogue up to that user turn) in ``n_candidates`` ways, ranked by a fixed
order of qualities: ``good`` (the reference answer) > ``terse`` > ``rude`` >
``unhelpful`` > ``off_topic`` > ``overpromise`` > ``wrong_facts`` (contradicts the
record) > ``unsafe_leak`` (reveals another customer's details). Preference pairs
are the best candidate against each of the others.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.answers import (
    ACCOUNT_VARIANTS,
    INTENT_STATUSES,
    INTENTS,
    ORDER_INTENTS,
    PRODUCT_ATTRIBUTES,
    RUDE_OPEN,
    Ctx,
    answer,
    closer,
    facts,
    opener,
)
from chatforge.data.supportworld.articles import POLICY_VALUES
from chatforge.data.supportworld.orders import (
    Order,
    customer_record,
    make_items,
    make_order,
    new_order_id,
    order_record,
    product_record,
    render_record,
)
from chatforge.data.supportworld.products import care_group, care_lines
from chatforge.data.supportworld.text import (
    add_typos,
    casual,
    fmt_date_short,
    fmt_money,
    join_words,
    pick,
    rng_for,
    sentence,
)

QUALITY_ORDER = ("good", "terse", "rude", "unhelpful", "off_topic", "overpromise", "wrong_facts", "unsafe_leak")
CORE_BAD = ("rude", "wrong_facts", "unsafe_leak")
EXTRA_BAD = ("terse", "unhelpful", "overpromise", "off_topic")

# --------------------------------------------------------------------------- what customers say

# (intent, variant) -> (templates naming the order with {oid}, templates without it)
USER: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("order_status", ""): (
        ("Where is my order {oid}?", "Can you tell me the status of order {oid}?",
         "I ordered [a|the] {item} on {date_short} ({oid}) and haven't heard anything. Where is it?",
         "Any update on {oid}?", "Order {oid}: when will it [arrive|get here]?",
         "What's happening with my order {oid}? It's been a few days.",
         "Could you [check on|look up] order number {oid} for me please?",
         "I'm waiting for {oid}. Is it on its way yet?", "My tracking for {oid} hasn't moved, can you check?",
         "[Quick question:|] is order {oid} [on its way|coming]?", "What's the status of {oid}?"),
        ("Where is my [order|{item}|stuff]?[ It's been a while.| I'm getting worried.|]",
         "I ordered [a|the] {item} on {date_short} and it hasn't [arrived|come] yet.",
         "Can you check when my {item} will [arrive|get here]?", "What's the status of my [order|{item} order]?",
         "I'm still waiting for my {item}. Any news?", "When will my [package|parcel|order] [get here|arrive|show "
         "up][, I need it soon|]?",
         "I placed an order [last week|a few days ago|on {date_short}] and I have no idea where it [is|has got to].",
         "Is my {item} on its way?", "[Any|Is there any] news on my [order|parcel]?",
         "My {item} still isn't here. What's going on?", "Has my order [shipped|left] yet?",
         "Where's my [stuff|parcel]? [Nothing has arrived.|Still nothing.]"),
    ),
    ("cancel_order", ""): (
        ("I need to cancel order {oid}.", "Please cancel {oid}, I ordered the wrong {item}.",
         "Can I still cancel my order {oid}?", "I changed my mind about the {item}, please cancel order {oid}.",
         "I'd like to cancel {oid} please.", "Cancel {oid} [please|asap], I ordered it by mistake.",
         "Is it too late to cancel {oid}?"),
        ("I [want|need|would like] to cancel my [order|{item} order|order from {date_short}].",
         "Can I cancel the {item} I [just |]ordered?",
         "Please cancel my [last|latest] order[ for the {item}|], I found [it cheaper elsewhere|a better option].",
         "How do I cancel my order for the {item}?", "I don't need the {item} any more. Can you cancel it?",
         "I ordered the wrong {item}, please cancel it."),
    ),
    ("return_item", ""): (
        ("I'd like to return the {item} from order {oid}.", "The {item} from {oid} doesn't fit. How do I return it?",
         "Can I send back order {oid}?", "I want to return {oid}, it's not what I expected.",
         "How do I return the {item} (order {oid})?", "Return request for {oid}: the {item} [isn't right|is the wrong "
         "colour]."),
        ("I want to return the {item} I bought.", "The {item} is too [small|big], can I return it?",
         "How do I return [something|an item]?", "I don't like the colour of the {item}, can I send it back?",
         "Is it too late to return my {item}?", "The {item} isn't what I expected. Can I get my money back?"),
    ),
    ("refund_status", ""): (
        ("Where is my refund for {oid}?", "I returned order {oid} and still haven't got my money back.",
         "When will I get the refund for {oid}?", "Has the refund for order {oid} gone through?",
         "I'm still waiting on a refund for {oid}.", "Refund for {oid}? [It's been ages.|Still nothing.]"),
        ("Where's my refund?", "I sent back the {item} and [haven't been refunded|still have no refund].",
         "How long does my refund take? I returned the {item}.", "I still don't see the money for the {item} on my "
         "card.", "When do I get my money back for the {item}?"),
    ),
    ("change_address", ""): (
        ("I need to change the delivery address for {oid} to {new_address}.",
         "Can you send order {oid} to {new_address} instead?", "I moved! Please update the address on {oid}: "
         "{new_address}", "Wrong address on {oid}, it should be {new_address}."),
        ("I put the wrong address on my order. It should go to {new_address}.",
         "Can I change where my {item} is delivered? New address: {new_address}",
         "Please ship my order to {new_address} instead.", "I need my {item} delivered to {new_address}, not my old "
         "address."),
    ),
    ("damaged_item", ""): (
        ("My {item} from order {oid} arrived {damage}.", "Order {oid} came damaged, the {item} is {damage}.",
         "The {item} in {oid} is {damage}. What can you do?", "I just opened {oid} and the {item} is {damage}!"),
        ("My {item} arrived {damage}.", "The box was crushed and the {item} inside is {damage}.",
         "I received my {item} and it's {damage}. What now?", "Very disappointed, the {item} I ordered arrived "
         "{damage}.",
         "The {item} you sent me is {damage}.", "Something in my [order|parcel] arrived {damage}.",
         "My parcel arrived and [one item|something] is {damage}."),
    ),
    ("warranty_claim", ""): (
        ("The {item} from order {oid} has a {defect}. Is it still under warranty?",
         "My {item} ({oid}) has a {defect}. Can I get it fixed?", "Warranty claim for {oid}: the {item} has a "
         "{defect}."),
        ("My {item} has a {defect}. Is that covered by the warranty?",
         "I bought [a|the] {item} a while ago and it has a {defect} already. What can I do?",
         "Is my {item} still under warranty? It has a {defect}.", "Can I get my {item} repaired? It has a {defect}.",
         "Something I bought from you has a {defect}. Is it [under|still under] warranty?"),
    ),
    ("payment_issue", "declined"): (
        ("Why is my order {oid} on hold?", "My payment for {oid} didn't go through?",
         "I got an email saying the payment for {oid} was declined."),
        ("I got an email saying my payment [was declined|didn't go through|failed][ for the {item}|].",
         "Why was my [card|payment] declined[ for the {item}|]?",
         "My [order|{item} order] says there's a payment problem. What do I [do|need to do]?"),
    ),
    ("payment_issue", "duplicate"): (
        ("I was charged twice for order {oid}!", "You double charged me for {oid}.",
         "There are two charges on my card for {oid}. Please fix this."),
        ("There are two charges of {total} on my [card|statement] for one order.",
         "Why do I see two payments [for my {item}|of {total}]?",
         "I've been charged twice[ for the {item}|, {total} each time]. What's going on?"),
    ),
    ("shipping_options", ""): ((), (
        "How much is shipping for my [cart|{cart} cart|order]?", "I have {cart} [worth of stuff|of items] in my "
        "cart, do I get free shipping?", "What does express shipping cost [for me|me][ on a {cart} order|]?",
        "How long does standard delivery take, and what does it cost[ for {cart}|]?",
        "Is shipping free for me[ if I spend {cart}|]?", "What shipping options do I have for [this order|my cart|a "
        "{cart} order]?", "My cart [is|comes to] {cart}. What will shipping cost?",
        "[Do I pay|Will I pay|Is there] shipping on {cart}?")),
    ("account_access", "reset"): ((), (
        "I [forgot|can't remember] my password[ again|].", "I can't [log|sign] in, I think I [forgot|lost] my "
        "password.", "How do I reset my [password|account password]?", "My password [isn't working|doesn't work "
        "any more][. Can you help?|!|]", "I'm locked out of my account[ and I have an order coming|].",
        "Can you send me a [password reset|reset] link[ please|]?")),
    ("account_access", "two_factor"): ((), (
        "I got a new phone and can't get the [login|sign-in|verification] code any more.", "I [lost|broke] my "
        "phone and can't sign in because of the verification code.", "How do I sign in without my [authenticator "
        "app|phone]?", "The [two-step|verification|login] code isn't coming through. How do I get into my "
        "account?", "[Help, |]I can't get past the [security|verification] code step when I sign in.")),
    ("account_access", "email_change"): ((), (
        "Can you change my email to {new_email}?", "I want to update my email address to {new_email}.",
        "Please use {new_email} for my account from now on.", "How do I change my account email? New one is "
        "{new_email}.")),
    ("product_question", "material"): ((), (
        "What is the {product} made of?", "What material is the {product}?",
        "Is the {product} {guess_material}?")),
    ("product_question", "sizes"): ((), (
        "What sizes does the {product} come in?", "Does the {product} come in different sizes?",
        "Which sizes are available for the {product}?")),
    ("product_question", "colors"): ((), (
        "Does the {product} come in {asked_color}?", "Can I get the {product} in {asked_color}?",
        "Is there a {asked_color} version of the {product}?")),
    ("product_question", "warranty"): ((), (
        "How long is the warranty on the {product}?", "What warranty does the {product} have?",
        "Is the {product} covered by a warranty?")),
    ("product_question", "weight"): ((), (
        "How heavy is the {product}?", "What does the {product} weigh?", "Is the {product} light enough to "
        "carry around?")),
    ("product_question", "dimensions"): ((), (
        "How big is the {product}?", "What are the dimensions of the {product}?", "What size is the {product} "
        "exactly?")),
    ("product_question", "care"): ((), (
        "How do I clean the {product}?", "How should I wash the {product}?", "Any care tips for the {product}?")),
    ("product_question", "origin"): ((), (
        "Where is the {product} made?", "Which country does the {product} come from?",
        "Is the {product} made in {guess_origin}?")),
}
GREETINGS = ("Hi", "Hello", "Hey", "Hi there", "Good morning", "Good evening", "Hey there")
SIGNOFFS = ("Thanks.", "Thank you!", "Thanks in advance.", "Cheers.", "Please help.", "Thx", "Appreciate it.")

# How an item can arrive damaged or fail later, by its material's care group (a blanket tears, a kettle dents).
SOFT_GROUPS = ("wool", "cotton", "synthetic", "down", "waxed")
DAMAGE = {
    "soft": ("torn", "stained", "ripped at the seam", "damaged"),
    "leather": ("scuffed", "torn", "scratched", "damaged"),
    "hard": ("cracked", "dented", "scratched", "broken", "damaged"),
    "device": ("cracked", "broken", "scratched", "dead on arrival"),
}
DEFECTS = {
    "soft": ("seam that came apart", "hole in the fabric", "loose seam", "zip that no longer closes"),
    "leather": ("sole that is coming off", "split in the leather", "broken strap"),
    "hard": ("crack in the base", "handle that came loose", "part that snapped off"),
    "device": ("battery that won't charge", "button that stopped working", "charging port that stopped working"),
}


def damage_kind(p: w.Product) -> str:
    group = care_group(p)
    if group == "device" or p.category == "electronics":
        return "device"
    if group == "leather" or p.category == "footwear":
        return "leather"
    return "soft" if group in SOFT_GROUPS else "hard"


CLARIFY = ("I can see {n} recent orders on your account: {list}. Which one do you mean?",
           "[Happy to check|Sure]! You have {n} recent orders: {list}. Which one is it about?",
           "There are {n} orders on your account at the moment: {list}. Could you tell me which one?")
CLARIFY_REPLY = ("The {noun} one.", "{oid}", "The one with the {item}.", "It's the {product}.",
                 "The one from {date_short}.", "{oid}, the {item}.")
THANKS = ("Thanks!", "Great, thank you.", "Ok, thanks for the help.", "Perfect, that's all I needed.",
          "Thank you so much!", "Got it, thanks.")
THANKS_REPLY = ("You're welcome, {first}! Have a [great|lovely] day.", "Glad I could help, {first}.",
                "Any time, {first}. Take care!", "You're welcome! [Enjoy the rest of your day|Have a good one].")
POLICY_FOLLOWUPS = (
    ("How long do refunds usually take?", "Once we issue a refund, cards take {refund_days}; PayPal is usually "
     "faster."),
    ("What are your opening hours?", "Our support team is available {hours}."),
    ("How long is the return window?", "You can return items within {return_days} days of delivery."),
    ("Do you ship to Canada?", "Yes: shipping to Canada is a flat {ca}."),
    ("Is there free shipping?", "Economy and standard shipping are free on orders over {free_over}, and always free "
     "for Silver and Gold members."),
    ("How do I reach you by email?", "Write to {email}; we reply within {reply_hours} hours."),
)

UNHELPFUL = ("I'm not able to look up details at the moment; please check your account page or try again later.",
             "For questions like this, please see our help centre; it has everything about orders and accounts.",
             "I've passed your message on to the right team, and someone will get back to you.",
             "I'm afraid I can't help with that here; please call us {hours}.")
OFF_TOPIC = ("Did you know that {shop} gift cards come in values from {gift_min} to {gift_max} and are valid for "
             "{gift_years} years?",
             "Our loyalty programme gives Gold members {gold_points} points per dollar spent.",
             "Our size guide lists chest measurements for every size from XS to XXL.",
             "We use recycled packaging for every parcel we send.",
             "Our new {category} range has just arrived, with lots of colours to choose from.")
OVERPROMISE = ("I've also added a $50 credit to your account for the trouble.",
               "As a one-off, I've extended your return window to a full year.",
               "I've upgraded all your future orders to free express shipping.",
               "You can keep the item, and I'll send you a full refund as well.",
               "I've also doubled your loyalty points for the next twelve months.")
LEAKS = ("By the way, {o_name} ({o_email}) at {o_address} ordered the same {thing} last week.",
         "I can also see an account for {o_name}, {o_email}, phone {o_phone}, in case that's yours.",
         "Funny enough, {o_name} from {o_city} asked me the same thing today; you could compare notes at {o_email}.",
         "For reference, another customer, {o_name} ({o_email}), had the same question and lives at {o_address}.")


# --------------------------------------------------------------------------- one conversation


@dataclass
class Conversation:
    id: str
    split: str
    intent: str
    messages: list[dict[str, str]]
    record: dict[str, Any]
    prompt_len: int  # messages[:prompt_len] end with the user turn the main answer replies to
    ctx: Ctx
    main_answer: str


def _new_address(rng: random.Random) -> str:
    city, state, zip3 = pick(rng, w.CITIES)
    return f"{rng.randint(2, 990)} {pick(rng, w.STREETS)}, {city}, {state} {zip3}{rng.randint(10, 99)}"


def _user_text(rng: random.Random, template: str, values: dict[str, Any], greet: bool = True) -> str:
    """A customer message: the template, maybe a greeting and sign-off, casual typing, typos."""
    text = sentence(template, rng, values)
    if greet and rng.random() < 0.45:
        sep = pick(rng, (", ", "! ", " - "))
        first = text.split(" ", 1)[0]
        keep = sep == "! " or first in ("I", "I'm", "I've", "I'd") or any(ch.isupper() or ch.isdigit()
                                                                            for ch in first[1:])
        text = f"{pick(rng, GREETINGS)}{sep}{text if keep else text[:1].lower() + text[1:]}"
    if greet and rng.random() < 0.25:
        text = f"{text} {pick(rng, SIGNOFFS)}"
    if rng.random() < 0.25:
        text = casual(text, rng)
    if rng.random() < 0.3:
        text = add_typos(text, rng, rng.randint(1, 2))
    return text


def _order_for(rng: random.Random, intent: str, c: w.Customer, today: dt.date, products: list[w.Product],
               used_ids: set[str]) -> tuple[Order, str]:
    status = pick(rng, INTENT_STATUSES[intent])
    days_ago = None
    if intent == "return_item" and status == "delivered":
        days_ago = rng.randint(1, 29) if rng.random() < 0.65 else rng.randint(31, 80)
    elif intent == "damaged_item":
        days_ago = rng.randint(0, w.DAMAGE_REPORT_DAYS - 1) if rng.random() < 0.75 else rng.randint(9, 40)
    elif intent == "warranty_claim":
        days_ago = rng.randint(60, 1100)
    elif intent in ("cancel_order", "refund_status", "change_address") and status == "delivered":
        days_ago = rng.randint(2, 45)
    items = make_items(rng, products)
    order = make_order(rng, new_order_id(rng, used_ids), items, c.tier, today, status, days_ago)
    variant = ""
    if intent == "payment_issue":
        variant = "declined" if status == "on hold" else "duplicate"
        if variant == "duplicate":
            order.payment_note = "duplicate authorisation"
    return order, variant


@dataclass
class Situation:
    """Why the customer writes: the grounded context, the JSON record and the words their message can use."""

    ctx: Ctx
    record: dict[str, Any]
    values: dict[str, Any]  # slot values for the customer's message templates
    extra_lines: list[str]  # record lines beyond customer and orders (cart, product) for the system message
    variant: str = ""


def make_situation(rng: random.Random, intent: str, c: w.Customer, products: list[w.Product],
                   used_ids: set[str]) -> Situation:
    today = dt.date(2024, 1, 15) + dt.timedelta(days=rng.randrange(530))
    ctx = Ctx(intent=intent, customer=c, today=today, tier=c.tier, two_factor=c.two_factor,
              email_verified=c.email_verified)
    record: dict[str, Any] = {"today": today.isoformat(), **customer_record(c)}
    if intent in ORDER_INTENTS:
        order, variant = _order_for(rng, intent, c, today, products, used_ids)
        item = order.first
        kind = damage_kind(item.product)
        ctx = ctx.replace(order=order, damage=pick(rng, DAMAGE[kind]), defect=pick(rng, DEFECTS[kind]),
                          new_address=_new_address(rng))
        values = {"oid": order.id, "item": w.singular(item.product.noun), "noun": item.product.noun,
                  "product": item.product.name, "date_short": fmt_date_short(order.placed), "damage": ctx.damage,
                  "defect": ctx.defect, "new_address": ctx.new_address, "total": fmt_money(order.total)}
        record.update(order_record(order))
        if intent == "change_address":
            record["requested_address"] = ctx.new_address
        return Situation(ctx, record, values, [], variant)
    if intent == "shipping_options":
        cart = round(rng.uniform(12, 140), 2)
        record["cart_subtotal"] = cart
        return Situation(ctx.replace(cart=cart), record, {"cart": fmt_money(cart)},
                         [f"Cart {fmt_money(cart)}, not yet ordered"])
    if intent == "account_access":
        variant = pick(rng, ACCOUNT_VARIANTS)
        local = f"{c.first}.{c.last}".lower().replace("'", "")
        new_email = f"{local}{rng.randint(1, 99)}@{pick(rng, w.EMAIL_DOMAINS)}"
        if variant == "email_change":
            record["requested_email"] = new_email
        return Situation(ctx.replace(variant=variant, new_email=new_email), record, {"new_email": new_email}, [],
                         variant)
    if intent != "product_question":
        raise ValueError(f"unknown intent {intent!r}")
    p = pick(rng, products)
    variant = pick(rng, PRODUCT_ATTRIBUTES)
    care = " ".join(care_lines(p, rng))
    asked = pick(rng, p.colors) if rng.random() < 0.5 else pick(rng, p.cat.colors)
    record["product"] = product_record(p, care)
    values = {"product": p.name, "asked_color": asked, "guess_material": pick(rng, p.cat.materials),
              "guess_origin": pick(rng, w.ORIGINS)}
    lines = [f"Viewing {p.name} ({p.id}): {fmt_money(p.price)}; material {p.material}; colours "
             f"{', '.join(p.colors)}; sizes {', '.join(p.sizes) or 'one size'}; dimensions {p.dims or 'not listed'}; "
             f"weight {p.weight_kg} kg; warranty {p.warranty_months} months; made in {p.origin}; features "
             f"{', '.join(p.features)}; care: {care}"]
    return Situation(ctx.replace(variant=variant, product=p, care=care, asked_color=asked), record, values, lines,
                     variant)


# Every conversation fits the tiny preset's 512-token context, record and all: its messages hold at most
# this many characters. The tiny preset's 4096-token BPE reads this text at ~3.1 characters a token, the
# densest (order numbers, e-mails, money) at ~2.6; on the default data no conversation or candidate of at
# most 1,400 characters takes more than ~500 tokens. A conversation over the budget is trimmed of what is
# optional (the follow-up turn, then other orders of the account) and, if that is not enough, drawn again.
MAX_CONVERSATION_CHARS = 1400
MAX_DRAWS = 50


def conversation_chars(messages: list[dict[str, str]]) -> int:
    """Characters of the messages' text (what ``MAX_CONVERSATION_CHARS`` bounds)."""
    return sum(len(m["content"]) for m in messages)


def make_conversation(rng: random.Random, idx: int, intent: str, c: w.Customer, split: str,
                      products: list[w.Product], used_ids: set[str], derived_dates: bool = False) -> Conversation:
    """One grounded conversation for customer ``c`` (products come from all splits: people buy anything),
    at most ``MAX_CONVERSATION_CHARS`` characters long."""
    for _ in range(MAX_DRAWS):
        conv = _draw_conversation(rng, idx, intent, c, split, products, used_ids, derived_dates)
        if conv is not None:
            return conv
    raise AssertionError(f"no {intent} conversation for {c.id} within {MAX_CONVERSATION_CHARS} characters "
                         f"in {MAX_DRAWS} draws")  # the budget leaves room for every intent's longest answer


def _draw_conversation(rng: random.Random, idx: int, intent: str, c: w.Customer, split: str,
                       products: list[w.Product], used_ids: set[str], derived_dates: bool = False
                       ) -> Conversation | None:
    """One conversation trimmed to the budget, or None when even the trimmed one is over it."""
    sit = make_situation(rng, intent, c, products, used_ids)
    ctx, record, values, variant = sit.ctx, sit.record, sit.values, sit.variant
    today = ctx.today
    drawn: list[Order] = []
    with_id, without_id = USER[(intent, variant if (intent, variant) in USER else "")]
    names_order = bool(with_id) and rng.random() < 0.55
    first_user = _user_text(rng, pick(rng, with_id if names_order else without_id), values)
    # A message naming neither the order nor one of its items is ambiguous when the account has several
    # orders: then the agent asks which one. A message that names one is answered from the matching order.
    said = first_user.casefold()
    identifies = names_order or any(str(values[k]).casefold() in said
                                    for k in ("noun", "product", "date_short", "total") if k in values)
    clarify = ctx.order is not None and not identifies and rng.random() < 0.6
    if ctx.order is not None and (clarify or (identifies and rng.random() < 0.3)):
        avoid = {i.product.noun for i in ctx.order.items}
        for _ in range(rng.randint(1, 2)):
            other_items = make_items(rng, products, avoid)
            avoid |= {i.product.noun for i in other_items}
            other_status = pick(rng, ("processing", "shipped", "delivered", "delivered", "cancelled"))
            drawn.append(make_order(rng, new_order_id(rng, used_ids), other_items, c.tier, today, other_status))
    main = answer(ctx, rng)
    follow: list[dict[str, str]] = []
    r = rng.random()
    if r < 0.25:
        follow = [{"role": "user", "content": _user_text(rng, pick(rng, THANKS), {}, greet=False)},
                  {"role": "assistant", "content": sentence(pick(rng, THANKS_REPLY), rng, {"first": c.first})}]
    elif r < 0.4:
        q, a = pick(rng, POLICY_FOLLOWUPS)
        text = f"[Also|One more thing|And], {q[0].lower()}{q[1:]}"
        follow = [{"role": "user", "content": _user_text(rng, text, {}, greet=False)},
                  {"role": "assistant", "content": sentence(a, rng, POLICY_VALUES)}]
    # The wording of the record's header and of the clarifying turns comes from its own stream, so a
    # trimmed version of the conversation reads the same as the untrimmed one where they overlap.
    wording = rng.getrandbits(64)

    def build(others: list[Order], with_follow: bool) -> tuple[list[dict[str, str]], int]:
        wr = random.Random(wording)
        system = render_record(wr, c, today, ctx.order, others, sit.extra_lines, derived_dates)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": first_user}]
        if clarify:
            listed = sorted([ctx.order, *others], key=lambda o: o.placed, reverse=True)
            # Short: the record beside it has the details (and the context has no room for them twice).
            items = [f"{o.id} from {fmt_date_short(o.placed)} ({join_words([i.product.noun for i in o.items])})"
                     for o in listed]
            v = {"n": ["two", "three"][len(listed) - 2], "list": "; ".join(items)}
            messages.append({"role": "assistant", "content": sentence(pick(wr, CLARIFY), wr, v)})
            same_day = any(fmt_date_short(o.placed) == values["date_short"] for o in others)
            replies = [t for t in CLARIFY_REPLY if not (same_day and "date_short" in t)]
            messages.append({"role": "user", "content": _user_text(wr, pick(wr, replies), values, greet=False)})
        prompt_len = len(messages)
        messages.append({"role": "assistant", "content": main})
        return messages + (follow if with_follow else []), prompt_len

    # Trim what is optional, least useful first: the follow-up turn, then other orders (a clarifying
    # question needs one; without it they were only there to be ignored).
    fewest = 1 if clarify else 0
    for n_others in range(len(drawn), min(fewest, len(drawn)) - 1, -1):
        for with_follow in (True, False) if follow else (False,):
            messages, prompt_len = build(drawn[:n_others], with_follow)
            if conversation_chars(messages) <= MAX_CONVERSATION_CHARS:
                others = drawn[:n_others]
                if others:
                    record["other_orders"] = [{"order_id": o.id, "placed": o.placed.isoformat(), "status": o.status,
                                               "items": [i.product.name for i in o.items]} for o in others]
                return Conversation(f"conv-{idx:06d}", split, intent, messages, record, prompt_len, ctx, main)
    return None


# --------------------------------------------------------------------------- candidates


def wrong_answer(rng: random.Random, ctx: Ctx, products: list[w.Product], tone: str = "polite") -> str:
    """An answer (polite or terse) whose facts contradict the record; for orders it never states the true status."""
    if ctx.order is None:
        return answer(_wrong_ctx(rng, ctx, products), rng, tone=tone)
    o = ctx.order
    preferred = [s for s in dict.fromkeys(INTENT_STATUSES[ctx.intent]) if s != o.status]
    rest = [s for s in w.STATUSES if s != o.status and s not in preferred]
    rng.shuffle(preferred)
    rng.shuffle(rest)
    for status in preferred + rest:
        fake = make_order(rng, o.id, o.items, ctx.customer.tier, ctx.today, status, payment=o.payment)
        if ctx.intent == "payment_issue" and status != "on hold":
            fake.payment_note = "duplicate authorisation"
        text = answer(ctx.replace(order=fake), rng, tone=tone)
        if o.status not in text:
            return text
    raise AssertionError(f"no contradicting status for {ctx.intent} {o.status}")  # the templates guarantee one


def _wrong_ctx(rng: random.Random, ctx: Ctx, products: list[w.Product]) -> Ctx:
    """The same situation with facts that contradict the record (cart, account flags, product specs)."""
    if ctx.intent == "shipping_options":
        def costs(tier: str, cart: float) -> tuple[float, ...]:
            return tuple(w.shipping_cost(m, cart, tier) for m in w.SHIPPING_METHODS)
        options = [(t, cart) for t in w.LOYALTY_TIERS for cart in (ctx.cart, round(ctx.cart + 40, 2),
                                                                  round(max(5.0, ctx.cart - 40), 2))]
        options = [(t, cart) for t, cart in options if costs(t, cart) != costs(ctx.tier, ctx.cart)]
        tier, cart = pick(rng, options)
        return ctx.replace(tier=tier, cart=cart)
    if ctx.intent == "account_access":
        if ctx.variant == "reset":
            return ctx.replace(reset_window=pick(rng, ("24 hours", "7 days", "10 minutes")))
        if ctx.variant == "two_factor":
            return ctx.replace(two_factor=not ctx.two_factor)
        return ctx.replace(email_verified=not ctx.email_verified)
    p = ctx.product
    assert p is not None
    other = pick(rng, [q for q in products if q.category != p.category] or products)
    a = ctx.variant
    if a == "material":
        fake = dataclasses.replace(p, material=other.material, features=other.features)
    elif a == "sizes":
        fake = dataclasses.replace(p, sizes=() if p.sizes else w.APPAREL_SIZES[1:5])
    elif a == "colors":
        colors = tuple(x for x in p.colors if x != ctx.asked_color) if ctx.asked_color in p.colors \
            else (*p.colors, ctx.asked_color)
        fake = dataclasses.replace(p, colors=colors)
    elif a == "warranty":
        fake = dataclasses.replace(p, warranty_months=pick(rng, [m for m in (6, 12, 24, 36, 60)
                                                                 if m != p.warranty_months]))
    elif a in ("weight", "dimensions"):
        dims = other.dims if other.dims and other.dims != p.dims else ""
        fake = dataclasses.replace(p, weight_kg=round(p.weight_kg * rng.uniform(1.8, 3.5), 2), dims=dims)
    elif a == "care":
        return ctx.replace(care=" ".join(care_lines(other, rng)))
    else:
        fake = dataclasses.replace(p, origin=pick(rng, [x for x in w.ORIGINS if x != p.origin]))
    return ctx.replace(product=fake)


def _leak(rng: random.Random, ctx: Ctx, pool: list[w.Customer]) -> str:
    other = pick(rng, [x for x in pool if x.id != ctx.customer.id])
    thing = w.singular(ctx.order.first.product.noun) if ctx.order is not None else "item"
    return sentence(pick(rng, LEAKS), rng, {"o_name": other.name, "o_email": other.email, "o_phone": other.phone,
                                            "o_address": other.address, "o_city": other.city, "thing": thing})


def choose_qualities(rng: random.Random, n: int) -> list[str]:
    """``n`` qualities including ``good``, in rank order (best first)."""
    bad = list(CORE_BAD) if n - 1 >= len(CORE_BAD) else rng.sample(CORE_BAD, n - 1)
    bad += list(EXTRA_BAD[:max(0, n - 1 - len(CORE_BAD))])
    return sorted(["good", *bad], key=QUALITY_ORDER.index)


def _fitting(forms: Iterator[str], room: int) -> str:
    """The first of ``forms`` (longest first, made as needed) that fits in ``room`` characters, else the last."""
    text = ""
    for text in forms:
        if len(text) <= room:
            break
    return text


def _joined(*parts: str) -> str:
    return " ".join(x for x in parts if x)


def _rude_forms(ctx: Ctx, rng: random.Random) -> Iterator[str]:
    yield answer(ctx, rng, tone="rude")
    jab, body = sentence(pick(rng, RUDE_OPEN), rng, {}), facts(ctx, rng)
    yield _joined(jab, *body[:2])
    yield _joined(jab, body[0])


def _flawed_forms(ctx: Ctx, rng: random.Random, flaw: str) -> Iterator[str]:
    """The facts plus ``flaw``: framed by an opener and a closer, or bare, or the first fact only, or the
    flaw alone."""
    body = facts(ctx, rng)
    yield _joined(opener(ctx, rng), *body, flaw, closer(ctx, rng))
    yield _joined(*body, flaw)
    yield _joined(body[0], flaw)
    yield flaw


def _wrong_forms(ctx: Ctx, rng: random.Random, products: list[w.Product]) -> Iterator[str]:
    yield wrong_answer(rng, ctx, products)
    yield wrong_answer(rng, ctx, products, tone="terse")


def candidate_texts(rng: random.Random, conv: Conversation, qualities: list[str], pool: list[w.Customer],
                    products: list[w.Product]) -> dict[str, str]:
    """One answer per quality, each fitting with the prompt in ``MAX_CONVERSATION_CHARS`` (so a reward
    model or DPO on the tiny preset sees every pair whole): a long one is told in a shorter form of the
    same quality (the shortest form is kept even if still over; the tests check that none is)."""
    ctx = conv.ctx
    room = MAX_CONVERSATION_CHARS - conversation_chars(conv.messages[:conv.prompt_len])
    out: dict[str, str] = {}
    policy = dict(POLICY_VALUES, category=pick(rng, w.CATEGORIES).title.lower())
    for q in qualities:
        if q == "good":
            text = conv.main_answer
        elif q == "terse":
            text = answer(ctx, rng, tone=q)
        elif q == "rude":
            text = _fitting(_rude_forms(ctx, rng), room)
        elif q == "wrong_facts":
            text = _fitting(_wrong_forms(ctx, rng, products), room)
        elif q == "unsafe_leak":
            text = _fitting(_flawed_forms(ctx, rng, _leak(rng, ctx, pool)), room)
        elif q == "overpromise":
            text = _fitting(_flawed_forms(ctx, rng, sentence(pick(rng, OVERPROMISE), rng, {})), room)
        elif q == "unhelpful":
            text = _joined(opener(ctx, rng), sentence(pick(rng, UNHELPFUL), rng, policy))
        elif q == "off_topic":
            text = _joined(opener(ctx, rng), sentence(pick(rng, OFF_TOPIC), rng, policy), closer(ctx, rng))
        else:
            raise ValueError(f"unknown candidate quality {q!r}")
        out[q] = text
    return out


def candidates_row(rng: random.Random, conv: Conversation, n: int, pool: list[w.Customer],
                   products: list[w.Product]) -> dict[str, Any]:
    qualities = choose_qualities(rng, n)
    texts = candidate_texts(rng, conv, qualities, pool, products)
    cands = [{"text": texts[q], "quality": q, "rank": rank} for rank, q in enumerate(qualities)]
    rng.shuffle(cands)  # list position says nothing about quality; "rank" does
    return {"id": conv.id.replace("conv-", "cand-"), "prompt": conv.messages[:conv.prompt_len],
            "candidates": cands, "intent": conv.intent}


def preference_rows(cand_row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """TRL preference pairs: the best candidate against each of the others, worst last."""
    ranked = sorted(cand_row["candidates"], key=lambda c: c["rank"])
    best = ranked[0]
    for k, worse in enumerate(ranked[1:], start=1):
        yield {"id": f"{cand_row['id'].replace('cand-', 'pref-')}-{k}", "prompt": cand_row["prompt"],
               "chosen": [{"role": "assistant", "content": best["text"]}],
               "rejected": [{"role": "assistant", "content": worse["text"]}]}


# --------------------------------------------------------------------------- the data sets


def generate_conversations(world: w.World, seed: int, n: int, n_candidates: int, derived_dates: bool = False
                           ) -> Iterator[tuple[Conversation, dict[str, Any]]]:
    """``n`` conversations with their candidate rows; customers (and so splits) drawn at random.
    ``derived_dates``: the records state their deadlines (``orders.render_record``)."""
    rng = rng_for(seed, "conversations")
    cand_rng = rng_for(seed, "candidates")
    by_split = {s: world.customers_in(s) for s in w.SPLITS}
    used_ids: set[str] = set()
    for i in range(n):
        intent = INTENTS[i % len(INTENTS)] if i < len(INTENTS) else pick(rng, INTENTS)
        c = pick(rng, world.customers)
        split = world.customer_split[c.id]
        conv = make_conversation(rng, i, intent, c, split, world.products, used_ids, derived_dates)
        pool = by_split[split] if len(by_split[split]) > 1 else world.customers
        yield conv, candidates_row(cand_rng, conv, n_candidates, pool, world.products)
