"""What the support assistant says: facts per intent from the record, wrapped in a tone.

``facts(ctx, rng)`` returns the sentences that answer the customer, computed from
the record only (order status and dates, product specs, account flags) and the
shop's policies. For every order intent the first sentence states the order's
status word for word, so a test (or a reward function) can check it. ``answer``
wraps the facts in a polite, rude or terse voice; the candidate generators in
``conversations`` build the flawed answers (wrong facts, leaks, ...) from the same
pieces.

Status words appear only through the ``{status}`` slot or in the branch for that
very status, so an answer rendered from a record with another status never
contains the true status by accident.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.articles import POLICY_VALUES
from chatforge.data.supportworld.orders import Order, payment_phrase
from chatforge.data.supportworld.text import (  # noqa: F401  (add_months: answers.add_months is public)
    add_business_days,
    add_months,
    fmt_date,
    fmt_money,
    join_words,
    pick,
    sentence,
)

INTENTS = ("order_status", "cancel_order", "return_item", "refund_status", "change_address", "damaged_item",
           "warranty_claim", "payment_issue", "shipping_options", "account_access", "product_question")
ORDER_INTENTS = INTENTS[:8]

# The statuses an order can have when a customer asks about it with each intent (repeats weight them).
INTENT_STATUSES: dict[str, tuple[str, ...]] = {
    "order_status": ("processing", "on hold", "shipped", "shipped", "out for delivery", "delayed", "delayed",
                     "delivered", "cancelled", "return requested", "refunded"),
    "cancel_order": ("processing", "processing", "processing", "shipped", "out for delivery", "delivered",
                     "cancelled"),
    "return_item": ("delivered", "delivered", "delivered", "delivered", "shipped", "out for delivery",
                    "return requested"),
    "refund_status": ("return requested", "refunded", "refunded", "cancelled", "delivered"),
    "change_address": ("processing", "processing", "on hold", "shipped", "out for delivery", "delivered"),
    "damaged_item": ("delivered",),
    "warranty_claim": ("delivered",),
    "payment_issue": ("on hold", "on hold", "processing", "shipped"),
}

ACCOUNT_VARIANTS = ("reset", "two_factor", "email_change")
PRODUCT_ATTRIBUTES = ("material", "sizes", "colors", "warranty", "weight", "dimensions", "care", "origin")
RESET_WINDOW = f"{w.RESET_LINK_MINUTES} minutes"


@dataclass
class Ctx:
    """Everything an answer may use: the record, plus what the customer said."""

    intent: str
    customer: w.Customer
    today: dt.date
    order: Order | None = None
    variant: str = ""  # account_access: ACCOUNT_VARIANTS; product_question: PRODUCT_ATTRIBUTES
    product: w.Product | None = None
    care: str = ""
    asked_color: str = ""
    cart: float = 0.0  # shipping_options: the cart subtotal
    tier: str = ""  # the tier the answer assumes (the customer's, unless perturbed)
    two_factor: bool = False
    email_verified: bool = True
    reset_window: str = RESET_WINDOW
    new_address: str = ""
    new_email: str = ""
    damage: str = ""
    defect: str = ""

    def replace(self, **changes: Any) -> Ctx:
        return dataclasses.replace(self, **changes)


def return_deadline(o: Order) -> dt.date:
    assert o.delivered is not None
    return o.delivered + dt.timedelta(days=w.RETURN_DAYS)


def _values(ctx: Ctx) -> dict[str, Any]:
    c = ctx.customer
    v = dict(POLICY_VALUES)
    v.update(first=c.first, email=c.email, address=c.address, today=fmt_date(ctx.today), tier=ctx.tier,
             new_address=ctx.new_address, new_email=ctx.new_email, damage=ctx.damage, defect=ctx.defect,
             reset_window=ctx.reset_window)
    o = ctx.order
    if o is not None:
        item = o.first
        v.update(oid=o.id, status=o.status, placed=fmt_date(o.placed), item=w.singular(item.product.noun),
                 product=item.product.name, price=fmt_money(item.product.price), item_amount=fmt_money(item.amount),
                 months=item.product.warranty_months, payment=payment_phrase(o.payment), total=fmt_money(o.total),
                 subtotal=fmt_money(o.subtotal), carrier=o.carrier, tracking=o.tracking,
                 refund=fmt_money(o.refund_amount if o.refund_amount is not None else item.amount))
        for key, day in (("shipped", o.shipped), ("eta", o.estimated), ("new_eta", o.new_estimate),
                         ("delivered", o.delivered), ("cancelled", o.cancelled), ("return_started", o.return_started),
                         ("refund_date", o.refund_date)):
            v[key] = fmt_date(day) if day else ""
        if o.delivered:
            v["last_return"] = fmt_date(return_deadline(o))
            v["warranty_end"] = fmt_date(add_months(o.delivered, item.product.warranty_months))
        if o.refund_date:
            v["refund_by"] = fmt_date(add_business_days(o.refund_date, 10))
    p = ctx.product
    if p is not None:
        v.update(product=p.name, material=p.material, colors=join_words(list(p.colors), "or"),
                 sizes=f"{p.sizes[0]} to {p.sizes[-1]}" if p.sizes else "", dims=p.dims, weight=p.weight_kg,
                 months=p.warranty_months, origin=p.origin, price=fmt_money(p.price), care=ctx.care,
                 asked_color=ctx.asked_color, features=join_words(list(p.features)))
    return v


STATUS_LINES = (
    "Order {oid} [currently |]shows as {status}.",
    "The status of order {oid} is {status}.",
    "I've checked order {oid}, and its status is {status}.",
    "Your order {oid} is marked as {status} in our system.",
    "Right now, order {oid} has the status {status}.",
    "[I can see that|Looking at your account,] order {oid} is listed as {status}.",
)

# What to say about an order in each status when nothing more specific applies.
STATUS_FACTS: dict[str, tuple[str, ...]] = {
    "processing": ("It was placed on {placed} and [is being packed|is being prepared] in our warehouse.",
                   "[Orders usually leave|Most orders leave] within one business day, and [you'll get|we'll send "
                   "you] an email with the tracking number as soon as it's on its way."),
    "on hold": ("The payment with {payment} didn't go through, so the order is waiting for updated payment details.",
                "You can update them with the link in the email we sent to {email}; the order waits seven days "
                "before we have to drop it."),
    "shipped": ("It left our warehouse on {shipped} with {carrier}[, tracking number {tracking}| (tracking number "
                "{tracking})].",
                "The estimated delivery date is {eta}."),
    "out for delivery": ("{carrier} expects to [bring it|drop it off] today[, {today}|]; [keep an eye out for|look "
                         "out for] a text with the delivery window.",
                         "The tracking number is {tracking}."),
    "delayed": ("It left our warehouse on {shipped} with {carrier} (tracking number {tracking}) and was due on {eta}, "
                "so it's running late[, and I'm sorry about that|].",
                "{carrier}'s new estimate is {new_eta}.",
                "If it still hasn't arrived {trace_days} business days after the original estimate, we'll open a "
                "trace with the carrier."),
    "delivered": ("{carrier} [delivered it|confirmed delivery] on {delivered}.",
                  "If you can't find it, [check around your door and with your neighbours|look around your door and "
                  "ask your neighbours]; if it doesn't turn up, let us know within {damage_days} days."),
    "cancelled": ("It was cancelled on {cancelled}, and {refund} went back to {payment} the same day.",
                  "Refunds take {refund_days} to show on your statement."),
    "return requested": ("You started a return on {return_started}, and we're waiting for the parcel to reach our "
                         "warehouse.",
                         "Once it arrives we check it within two business days and send {refund} back to {payment}."),
    "refunded": ("We sent {refund} back to {payment} on {refund_date}.",
                 "It can take {refund_days} to show on your statement."),
}


def _refund_timing(ctx: Ctx) -> str:
    o = ctx.order
    assert o is not None and o.refund_date is not None
    if o.payment == "PayPal":
        return "PayPal refunds usually arrive within one business day."
    if o.payment == "gift card":
        return "Gift card refunds are instant, so the balance is already back on your card."
    if ctx.today <= add_business_days(o.refund_date, 10):
        return "Card refunds take {refund_days}, so it should [appear|show up] by {refund_by}."
    return ("That was more than {refund_days} ago, so I've emailed the refund reference to {email}; your bank can use "
            "it to trace the payment.")


def _order_facts(ctx: Ctx) -> tuple[str, ...]:
    """Sentences (templates) after the status line, for the intent and the order's status."""
    o = ctx.order
    assert o is not None
    s, intent = o.status, ctx.intent
    in_window = o.delivered is not None and ctx.today <= return_deadline(o)
    if intent == "cancel_order":
        if s == "processing":
            return ("It hasn't left our warehouse yet, so I've cancelled it for you.",
                    "The full {total} goes back to {payment}[; the pending charge disappears within {auth_days}|].")
        if s == "on hold":
            return ("Since the payment never went through, I've called it off and nothing will be charged.",)
        if s in ("shipped", "out for delivery", "delayed"):
            extra = ("You can also refuse the parcel at the door; it comes back to us and we refund you when it "
                     "arrives.",) if s == "out for delivery" else ()
            return ("It has already left our warehouse with {carrier}, so it can't be called off any more.",
                    "Once it arrives, you can return it for free within {return_days} days[ for a full refund|].",
                    *extra)
        if s == "delivered":
            if in_window:
                return ("It arrived on {delivered}, so it's too late to call it off, but you can return it until "
                        "{last_return}[ for a full refund|].",)
            return ("It arrived on {delivered}, and the {return_days}-day return window closed on {last_return}, so I "
                    "can't take it back any more.",)
        if s == "cancelled":
            return ("Nothing more to do: it was called off on {cancelled}, and {refund} went back to {payment}.",)
    elif intent == "return_item":
        if s == "delivered" and in_window:
            seal = ("Earbuds can only be returned with the hygiene seal intact.",) \
                if o.first.product.noun == "wireless earbuds" else ()
            return ("It arrived on {delivered}, so you can return it until {last_return}.", *seal,
                    "I've emailed a prepaid return label to {email}; drop the parcel off at any carrier location "
                    "within 14 days.",
                    "Once it reaches us we send {item_amount} back to {payment} within two business days, and your "
                    "bank then takes {refund_days}.")
        if s == "delivered":
            return ("It arrived on {delivered}, and the {return_days}-day return window closed on {last_return}, so "
                    "I'm afraid I can't accept a return.",
                    "If the {item} is faulty, it's still covered by its {months}-month warranty, and I can start a "
                    "claim for you.")
        if s in ("shipped", "out for delivery", "delayed"):
            return ("It hasn't reached you yet; the estimated delivery date is {eta}.",
                    "Once it's with you, you'll have {return_days} days to return it from your order page.")
        if s == "processing":
            return ("It hasn't left our warehouse yet, so you can simply cancel it instead of returning it[; just say "
                    "the word|].",)
        if s == "return requested":
            return ("A return was already started on {return_started}, and the label went to {email}.",
                    "Once the parcel reaches us, we send {refund} back to {payment} within two business days.")
    elif intent == "refund_status":
        if s == "refunded":
            return ("We issued a refund of {refund} to {payment} on {refund_date}.", _refund_timing(ctx))
        if s == "return requested":
            return ("We haven't received the parcel yet; the return was started on {return_started}.",
                    "As soon as it arrives we check it within two business days and send {refund} back to "
                    "{payment}.")
        if s == "cancelled":
            return ("It was called off on {cancelled} and {refund} went back to {payment} the same day.",
                    "Card refunds take {refund_days} to show on your statement.")
        if s == "delivered":
            if in_window:
                return ("I can't see a return for this order, so no refund has been issued yet.",
                        "You can start a return from your order page until {last_return}.")
            return ("I can't see a return for this order, and the return window closed on {last_return}.",)
    elif intent == "change_address":
        if s in ("processing", "on hold"):
            return ("It hasn't left our warehouse, so I've changed the delivery address to {new_address}.",
                    "You'll get a confirmation at {email}.")
        if s in ("shipped", "out for delivery", "delayed"):
            return ("It's already with {carrier}, so I can't change the address any more.",
                    "You can ask {carrier} to redirect it using the tracking number {tracking}.")
        if s == "delivered":
            return ("It already arrived on {delivered} at {address}, so the address can't be changed for this "
                    "order.",
                    "I've saved {new_address} as your address for future orders.")
    elif intent == "damaged_item":
        if s == "delivered":
            if ctx.today <= o.delivered + dt.timedelta(days=w.DAMAGE_REPORT_DAYS):
                return ("It arrived on {delivered}, so you're within the {damage_days}-day window for reporting "
                        "damage.",
                        "I'm sorry the {item} is {damage}. I can send a replacement, which leaves our warehouse "
                        "within one business day, or send {item_amount} back to {payment}; which would you prefer?",
                        "You don't need to send the damaged one back.")
            return ("It arrived on {delivered}, more than {damage_days} days ago, so it's past the window for "
                    "reporting delivery damage.",
                    "If the {item} is faulty, its {months}-month warranty still applies; send us a photo and I'll "
                    "start a claim.")
        if s in ("processing", "on hold", "shipped", "out for delivery", "delayed"):
            return ("Our records show it hasn't reached you yet, so this may be a different parcel; could you check "
                    "the order number on the packing slip?",)
    elif intent == "warranty_claim":
        if s == "delivered":
            if ctx.today <= add_months(o.delivered, o.first.product.warranty_months):
                return ("It arrived on {delivered}, and the {product} has a {months}-month warranty, so it's covered "
                        "until {warranty_end}.",
                        "Please reply with a photo or a short video of the {defect} and I'll arrange a repair or a "
                        "replacement; shipping is on us.")
            return ("It arrived on {delivered}, and the {product}'s {months}-month warranty ended on {warranty_end}, "
                    "so it's no longer covered.",
                    "I'm sorry I can't offer a free repair; the {product} currently costs {price} if you'd like a "
                    "new one.")
    elif intent == "payment_issue":
        if s == "on hold":
            return ("The payment with {payment} was declined, so the order is waiting for new payment details.",
                    "Use the link in the email we sent to {email} to update them; the order waits seven days.",
                    "Your bank can tell you why it was declined; we aren't told the reason.")
        if o.payment_note == "duplicate authorisation":
            return ("I can see one charge of {total} for this order; the second one is a pending authorisation from "
                    "a retried payment.",
                    "It drops off your statement within {auth_days}, so you won't pay twice.")
    return STATUS_FACTS[s]


def _shipping_facts(ctx: Ctx, v: dict[str, Any]) -> tuple[str, ...]:
    cart, tier = ctx.cart, ctx.tier
    cost = {m: w.shipping_cost(m, cart, tier) for m in w.SHIPPING_METHODS}
    v.update(cart=fmt_money(cart), **{f"{m[:3]}_now": fmt_money(c) if c else "free" for m, c in cost.items()},
             diff=fmt_money(max(0.0, w.FREE_SHIPPING_OVER - cart)))
    lines = ["With {cart} in your cart, standard shipping is {sta_now} ({sta_min} to {sta_max} business days) and "
             "express is {exp_now} ({exp_min} to {exp_max} business days)."]
    if tier in w.FREE_EXPRESS_TIERS:
        lines.append("As a {tier} member, you get both standard and express shipping free.")
    elif tier in w.FREE_STANDARD_TIERS:
        lines.append("As a {tier} member, standard shipping is always free for you.")
    elif cart >= w.FREE_SHIPPING_OVER:
        lines.append("Standard shipping is free because your cart is over {free_over}.")
    else:
        lines.append("Add {diff} more to reach {free_over}, and standard shipping becomes free.")
    lines.append("Economy is {eco_now} and takes {eco_min} to {eco_max} business days.")
    return tuple(lines)


def _account_facts(ctx: Ctx) -> tuple[str, ...]:
    if ctx.variant == "reset":
        return ("I've sent a password reset link to {email}; it works for {reset_window}.",
                "If it isn't in your inbox in a few minutes, check your spam folder.",
                "Resetting the password signs you out on every device[, for your security|].")
    if ctx.variant == "two_factor":
        if ctx.two_factor:
            return ("Two-step verification is on for your account, so you can sign in with one of your backup codes "
                    "instead of the code from your phone.",
                    "If you don't have them, I've sent a verification link to {email}; once you confirm it, you can "
                    "set up two-step verification on your new phone.")
        return ("Two-step verification isn't turned on for your account, so you only need your email and password "
                "to sign in.",
                "If the password doesn't work, I can send a reset link to {email}.")
    if ctx.email_verified:
        return ("I've sent a confirmation link to {new_email}; until you confirm it, we'll keep using {email}.",
                "Orders already on their way keep sending updates to {email}.")
    return ("Your current address {email} was never verified, so I've sent a confirmation link to {new_email}; once "
            "you confirm it, it replaces the old one.",
            "Until then, order emails still go to {email}.")


def _product_facts(ctx: Ctx) -> tuple[str, ...]:
    p = ctx.product
    assert p is not None
    a = ctx.variant
    price = "It costs {price}[ and leaves our warehouse within one business day|]."
    if a == "material":
        return ("The {product} is made of {material}.", "It has {features}.")
    if a == "sizes":
        if p.sizes:
            return ("The {product} comes in sizes {sizes}.", "If you're between sizes, our size guide can help, and "
                    "exchanges for another size are free.")
        return ("The {product} comes in one size only.", price)
    if a == "colors":
        if ctx.asked_color in p.colors:
            return ("Yes, the {product} comes in {asked_color}.", "It's also available in the other colours listed "
                    "on the page.", price)
        return ("The {product} doesn't come in {asked_color}, I'm afraid; you can choose {colors}.", price)
    if a == "warranty":
        return ("The {product} has a {months}-month warranty against manufacturing defects.", price)
    if a == "weight":
        return ("The {product} weighs {weight} kg.", price)
    if a == "dimensions":
        if p.dims:
            return ("The {product} measures {dims}.", price)
        return ("We don't list dimensions for the {product}; it weighs {weight} kg.", price)
    if a == "care":
        return ("Here's how to care for the {product}: {care}",)
    return ("The {product} is made in {origin}.", price)


def facts(ctx: Ctx, rng: random.Random) -> list[str]:
    """The answer's content sentences, expanded; for orders, the status line comes first."""
    v = _values(ctx)
    if ctx.intent in ORDER_INTENTS:
        templates = (pick(rng, STATUS_LINES), *_order_facts(ctx))
    elif ctx.intent == "shipping_options":
        templates = _shipping_facts(ctx, v)
    elif ctx.intent == "account_access":
        templates = _account_facts(ctx)
    elif ctx.intent == "product_question":
        templates = _product_facts(ctx)
    else:
        raise ValueError(f"unknown intent {ctx.intent!r}")
    return [sentence(t, rng, v) for t in templates]


# --------------------------------------------------------------------------- tone

POLITE_OPEN = (
    "Hi {first}[, thanks for getting in touch|, thanks for reaching out|]!", "Hello {first}[, thanks for your message|].",
    "[Thanks for|Thank you for] [your message|reaching out], {first}.", "Hi {first}, [let me check that for you|I've "
    "looked into this for you].", "Of course, {first}[, happy to help|].", "Hi {first}.", "",
)
EMPATHY = ("I'm [really |]sorry [about this|to hear that], {first}.", "[Sorry|I'm sorry] for the trouble, {first}.",
           "That's frustrating, {first}, and I'm sorry.")
POLITE_CLOSE = ("Is there anything else I can help with?", "Let me know if there's anything else.",
                "[Happy|Glad] to help with anything else[ you need|].", "Have a [great|lovely] day!", "")
RUDE_OPEN = ("Look, [this is all on your order page|you could have checked this yourself].", "[Fine|Okay, fine].",
             "[Sigh|Ugh]. [Again?|Okay.]", "Not sure why you couldn't find this yourself, but here it is.",
             "We get this question all day.")
RUDE_CLOSE = ("Next time, check your order page before [contacting us|writing in].", "That's [all|it].",
              "Please don't [make me repeat this|ask again].", "Try reading the emails we send.",
              "Anything else, look it up yourself.")
NEEDS_EMPATHY = ("damaged_item", "warranty_claim", "payment_issue")


def answer(ctx: Ctx, rng: random.Random, tone: str = "polite") -> str:
    """A full reply: ``polite`` (the reference answer), ``rude`` (same facts) or ``terse`` (facts only)."""
    body = facts(ctx, rng)
    v = _values(ctx)
    if tone == "terse":
        return " ".join(body[:2])
    if tone == "rude":
        parts = [sentence(pick(rng, RUDE_OPEN), rng, v), *body, sentence(pick(rng, RUDE_CLOSE), rng, v)]
    elif tone == "polite":
        sad = ctx.intent in NEEDS_EMPATHY or (ctx.order is not None and ctx.order.status == "delayed")
        opener = pick(rng, EMPATHY) if sad and rng.random() < 0.7 else pick(rng, POLITE_OPEN)
        parts = [sentence(opener, rng, v), *body, sentence(pick(rng, POLITE_CLOSE), rng, v)]
    else:
        raise ValueError(f"unknown tone {tone!r}")
    return " ".join(p for p in parts if p)


def opener(ctx: Ctx, rng: random.Random) -> str:
    return sentence(pick(rng, POLITE_OPEN), rng, _values(ctx))


def closer(ctx: Ctx, rng: random.Random) -> str:
    return sentence(pick(rng, POLITE_CLOSE), rng, _values(ctx))
