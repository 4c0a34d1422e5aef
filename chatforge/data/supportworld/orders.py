"""Orders and the customer/order record a support conversation is grounded in.

``make_order`` builds an order whose dates, carrier and refund fields are
consistent with its status and with the shop's rules (dispatch one business day
after the order, delivery within the shipping method's window, refunds after the
return is received, ...). ``record`` turns customer + order into the JSON record
stored with each conversation, and ``render_record`` into the text the system
message shows the assistant: compact ``key value`` fields, one line per order, so that a
conversation with two or three orders still fits a 512-token context.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.text import add_business_days, add_months, fmt_date, fmt_money, pick, weekday

CARD_BRANDS = ("Visa", "Mastercard", "American Express", "Discover")


@dataclass
class Item:
    product: w.Product
    color: str
    size: str  # "" for one-size products
    qty: int

    @property
    def amount(self) -> float:
        return round(self.product.price * self.qty, 2)


@dataclass
class Order:
    id: str
    placed: dt.date
    status: str
    items: list[Item]
    method: str
    shipping: float
    payment: str  # "Visa ending in 4821", "PayPal", "Apple Pay", "gift card"
    carrier: str = ""
    tracking: str = ""
    shipped: dt.date | None = None
    estimated: dt.date | None = None  # estimated delivery date given at dispatch
    new_estimate: dt.date | None = None  # for delayed parcels
    delivered: dt.date | None = None
    cancelled: dt.date | None = None
    return_started: dt.date | None = None
    refund_amount: float | None = None
    refund_date: dt.date | None = None
    payment_note: str = ""  # "declined" | "duplicate authorisation" | ""

    @property
    def subtotal(self) -> float:
        return round(sum(i.amount for i in self.items), 2)

    @property
    def total(self) -> float:
        return round(self.subtotal + self.shipping, 2)

    @property
    def first(self) -> Item:
        return self.items[0]


def payment_phrase(payment: str) -> str:
    """How an answer names the payment method: ``your Visa ending in 4821``, ``your PayPal account``."""
    if payment == "PayPal":
        return "your PayPal account"
    if payment == "Apple Pay":
        return "the card behind your Apple Pay"
    if payment == "gift card":
        return "your gift card"
    return f"your {payment}"


def make_payment(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.7:
        return f"{pick(rng, CARD_BRANDS)} ending in {rng.randint(1000, 9999)}"
    if r < 0.85:
        return "PayPal"
    if r < 0.95:
        return "Apple Pay"
    return "gift card"


def make_tracking(rng: random.Random, carrier: str) -> str:
    prefix, digits = w.CARRIERS[carrier]
    return prefix + "".join(str(rng.randrange(10)) for _ in range(digits))


def make_items(rng: random.Random, products: list[w.Product], avoid_nouns: Collection[str] = ()) -> list[Item]:
    """One to three items, each a different kind of product (so "the sweater" names one item)."""
    items: list[Item] = []
    nouns = set(avoid_nouns)
    want = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
    for _ in range(20):
        if len(items) == want:
            break
        p = pick(rng, products)
        if p.noun in nouns:
            continue
        nouns.add(p.noun)
        items.append(Item(p, pick(rng, p.colors), pick(rng, p.sizes) if p.sizes else "",
                          rng.choices((1, 2), weights=(9, 1))[0]))
    return items


def new_order_id(rng: random.Random, used: set[str]) -> str:
    while True:
        oid = f"SW-{rng.randint(1_000_000, 9_999_999)}"
        if oid not in used:
            used.add(oid)
            return oid


def make_order(
    rng: random.Random,
    oid: str,
    items: list[Item],
    tier: str,
    today: dt.date,
    status: str,
    delivered_days_ago: int | None = None,
    payment: str | None = None,
) -> Order:
    """An order in ``status`` as of ``today``, with every date consistent with that status."""
    method = rng.choices(("economy", "standard", "express"), weights=(2, 6, 2))[0]
    m = w.SHIPPING_METHODS[method]
    subtotal = round(sum(i.amount for i in items), 2)
    order = Order(id=oid, placed=today, status=status, items=items, method=method,
                  shipping=w.shipping_cost(method, subtotal, tier), payment=payment or make_payment(rng))
    carrier = pick(rng, tuple(w.CARRIERS))

    def dispatch(shipped: dt.date) -> None:
        order.shipped, order.carrier, order.tracking = shipped, carrier, make_tracking(rng, carrier)
        order.placed = add_business_days(shipped, -1)
        order.estimated = add_business_days(shipped, m.max_days)

    if status == "processing":
        order.placed = today - dt.timedelta(days=rng.randint(0, 1))
    elif status == "on hold":
        order.placed = today - dt.timedelta(days=rng.randint(1, 4))
        order.payment_note = "declined"
    elif status == "shipped":
        days_back = rng.randint(0, m.min_days - 1)
        dispatch(add_business_days(today, -max(days_back, int(today.weekday() >= 5))))  # no weekend dispatch
    elif status == "out for delivery":
        dispatch(add_business_days(today, -rng.randint(m.min_days, m.max_days)))
        order.estimated = max(order.estimated, today)  # weekends can push the count past today
    elif status == "delayed":
        dispatch(add_business_days(today, -(m.max_days + rng.randint(2, 6))))
        order.new_estimate = add_business_days(today, rng.randint(1, 3))
    elif status in ("delivered", "return requested", "refunded"):
        if delivered_days_ago is None:
            delivered_days_ago = rng.randint(6, 25) if status != "delivered" else rng.randint(0, 20)
        delivered = today - dt.timedelta(days=delivered_days_ago)
        dispatch(add_business_days(delivered, -rng.randint(m.min_days, m.max_days)))
        order.delivered = delivered
        if status != "delivered":
            started = delivered + dt.timedelta(days=rng.randint(1, max(1, delivered_days_ago - 5)))
            order.return_started = min(started, today)
            order.refund_amount = order.subtotal
        if status == "refunded":
            order.refund_date = min(add_business_days(order.return_started, rng.randint(3, 6)), today)
    elif status == "cancelled":
        order.placed = today - dt.timedelta(days=rng.randint(1, 12))
        order.cancelled = order.placed + dt.timedelta(days=rng.randint(0, 1))
        order.refund_amount = order.total
        order.refund_date = order.cancelled
    else:
        raise ValueError(f"unknown order status {status!r}")
    return order


# --------------------------------------------------------------------------- records


def customer_record(c: w.Customer) -> dict[str, Any]:
    return {"customer_id": c.id, "name": c.name, "email": c.email, "phone": c.phone, "address": c.address,
            "tier": c.tier, "member_since": c.member_since.isoformat(), "email_verified": c.email_verified,
            "two_factor": c.two_factor}


def order_record(o: Order) -> dict[str, Any]:
    """The order as JSON; dates ISO, absent fields left out."""
    rec: dict[str, Any] = {
        "order_id": o.id, "status": o.status, "placed": o.placed.isoformat(),
        "items": [{"product_id": i.product.id, "name": i.product.name, "size": i.size, "color": i.color,
                   "qty": i.qty, "price": i.product.price} for i in o.items],
        "subtotal": o.subtotal, "shipping_method": o.method, "shipping_cost": o.shipping, "total": o.total,
        "payment": o.payment,
    }
    for key, value in (("carrier", o.carrier), ("tracking", o.tracking), ("shipped", o.shipped),
                       ("estimated_delivery", o.estimated), ("new_estimate", o.new_estimate),
                       ("delivered", o.delivered), ("cancelled", o.cancelled), ("return_started", o.return_started),
                       ("refund_amount", o.refund_amount), ("refund_date", o.refund_date),
                       ("payment_note", o.payment_note)):
        if value:
            rec[key] = value.isoformat() if isinstance(value, dt.date) else value
    return rec


def product_record(p: w.Product, care: str) -> dict[str, Any]:
    return {"product_id": p.id, "name": p.name, "material": p.material, "colors": list(p.colors),
            "sizes": list(p.sizes), "dimensions": p.dims, "weight_kg": p.weight_kg, "price": p.price,
            "warranty_months": p.warranty_months, "origin": p.origin, "features": list(p.features), "care": care}


def _item_text(i: Item) -> str:
    """``Nordvik Alpine Sweater, size M, in navy $89.00``; a quantity above one shows the line's amount too."""
    size = f", size {i.size}," if i.size else ""
    price = fmt_money(i.product.price) if i.qty == 1 else \
        f"{i.qty} x {fmt_money(i.product.price)} = {fmt_money(i.amount)}"
    return f"{i.product.name}{size} in {i.color} {price}"


def _order_line(o: Order, today: dt.date | None = None) -> str:
    """One order on one line, ``key value`` fields joined by ``; `` (a field only when the order has it).

    With ``today``, the line also states the deadlines the policy derives from its dates, as a shop's
    back office shows them: whether the return window and the warranty are still open (and until when)
    and when a card refund shows on the statement. Answering "can I still return it?" from the delivery
    date alone means adding 30 days and comparing with today's date, arithmetic a tiny model does not
    learn from a few thousand examples; stated, the decision is one word to read off the record."""
    ship = f" incl. {o.method} shipping {fmt_money(o.shipping)}" if o.shipping else ""
    note = f" ({o.payment_note})" if o.payment_note else ""
    fields = [f"Order {o.id}: {o.status}", f"placed {fmt_date(o.placed)}",
              f"items {' + '.join(_item_text(i) for i in o.items)}", f"total {fmt_money(o.total)}{ship}",
              f"paid with {o.payment}{note}"]
    if o.shipped:
        fields.append(f"shipped {fmt_date(o.shipped)} with {o.carrier}, tracking {o.tracking}")
    if o.estimated and not o.delivered:  # once delivered, the estimate answers nothing
        fields.append(f"due {fmt_date(o.estimated)}")
    if o.new_estimate:
        fields.append(f"new estimate {fmt_date(o.new_estimate)}")
    if o.delivered:
        fields.append(f"delivered {fmt_date(o.delivered)}")
        if today is not None:
            last_return = o.delivered + dt.timedelta(days=w.RETURN_DAYS)
            warranty_end = add_months(o.delivered, o.first.product.warranty_months)
            fields.append(f"returns until {fmt_date(last_return)}" if today <= last_return
                          else f"return window closed {fmt_date(last_return)}")
            fields.append(f"warranty until {fmt_date(warranty_end)}" if today <= warranty_end
                          else f"warranty ended {fmt_date(warranty_end)}")
    if o.cancelled:
        fields.append(f"cancelled {fmt_date(o.cancelled)}")
    if o.return_started:
        fields.append(f"return started {fmt_date(o.return_started)}")
    if o.refund_amount is not None:
        when = f"issued {fmt_date(o.refund_date)}" if o.refund_date else "due when the return arrives"
        if today is not None and o.refund_date and o.payment not in ("PayPal", "gift card"):
            shows_by = add_business_days(o.refund_date, 10)  # card refunds: up to 10 business days
            when += f", on the card by {fmt_date(shows_by)}" if today <= shows_by else \
                f", overdue since {fmt_date(shows_by)}"
        fields.append(f"refund {fmt_money(o.refund_amount)} {when}")
    return "; ".join(fields)


# Three wordings, so a model does not tie its behaviour to one sentence. Short, like the record:
# every token of the system message is one the conversation cannot use (the tiny preset's context is 512).
SYSTEM_HEADERS = (
    "You are {shop}'s support agent. Answer from this record; never share other customers' details.",
    "{shop} support agent: answer from the record below, and never share other customers' details.",
    "You help {shop}'s customers. Answer from this account record; keep other customers' details private.",
)


def render_record(rng: random.Random, c: w.Customer, today: dt.date, order: Order | None,
                  others: Sequence[Order] = (), extra: Sequence[str] = (), derived_dates: bool = False) -> str:
    """The system message: instructions, today's date, the customer and (when any) their orders,
    newest first, one line each of ``key value`` fields: the row's record in few tokens.
    ``derived_dates``: each order also states its open or closed deadlines (``_order_line``)."""
    head = pick(rng, SYSTEM_HEADERS).format(shop=w.SHOP)
    verified = "verified" if c.email_verified else "not verified"
    lines = [head, f"Today {weekday(today)}, {fmt_date(today)}",
             f"Customer {c.name} ({c.id}); email {c.email} ({verified}); address {c.address}; {c.tier} member; "
             f"two-step verification {'on' if c.two_factor else 'off'}"]
    orders = [o for o in (order, *others) if o is not None]
    orders.sort(key=lambda o: o.placed, reverse=True)
    lines += [_order_line(o, today if derived_dates else None) for o in orders]
    lines += extra
    return "\n".join(lines)
