"""English -> Spanish sentence pairs from a bilingual lexicon and a small grammar.

The lexicon gives each noun its Spanish gender and both numbers, and each
adjective its four forms (masculine/feminine x singular/plural). Sentence
templates build both sides in parallel, so every reference is correct Spanish:
articles, demonstratives and possessives agree with the noun, adjectives follow
the noun and agree in gender and number, verbs agree in number ("llega" /
"llegan"), and questions open with "¿". English sentences are unique; the splits
are cut from a shuffled list of them, so no held-out sentence is in train.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from chatforge.data.supportworld.text import a_an, capitalize, pick, rng_for


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str
    es: str
    es_pl: str
    gender: str  # "m" | "f"
    sized: bool = False  # clothing and shoes: has sizes


@dataclass(frozen=True)
class Adj:
    en: str
    m: str
    f: str
    m_pl: str
    f_pl: str

    def form(self, gender: str, plural: bool) -> str:
        return (self.m_pl if gender == "m" else self.f_pl) if plural else (self.m if gender == "m" else self.f)


def adj(en: str, es: str, plural: str | None = None, invariable: bool = False) -> Adj:
    """Spanish adjective forms from the masculine singular: -o -> -a/-os/-as, -e -> -es, else ``plural``."""
    if invariable:
        return Adj(en, es, es, es, es)
    if es.endswith("o"):
        return Adj(en, es, es[:-1] + "a", es + "s", es[:-1] + "as")
    if es.endswith("e"):
        return Adj(en, es, es, es + "s", es + "s")
    assert plural is not None, f"give the plural of {es!r}"
    return Adj(en, es, es, plural, plural)


NOUNS = (
    Noun("sweater", "sweaters", "suéter", "suéteres", "m", True), Noun("hoodie", "hoodies", "sudadera", "sudaderas",
                                                                       "f", True),
    Noun("T-shirt", "T-shirts", "camiseta", "camisetas", "f", True), Noun("shirt", "shirts", "camisa", "camisas",
                                                                          "f", True),
    Noun("jacket", "jackets", "chaqueta", "chaquetas", "f", True), Noun("coat", "coats", "abrigo", "abrigos", "m",
                                                                        True),
    Noun("dress", "dresses", "vestido", "vestidos", "m", True), Noun("skirt", "skirts", "falda", "faldas", "f", True),
    Noun("scarf", "scarves", "bufanda", "bufandas", "f"), Noun("hat", "hats", "sombrero", "sombreros", "m"),
    Noun("boot", "boots", "bota", "botas", "f", True), Noun("shoe", "shoes", "zapato", "zapatos", "m", True),
    Noun("sandal", "sandals", "sandalia", "sandalias", "f", True),
    Noun("sock", "socks", "calcetín", "calcetines", "m", True),
    Noun("backpack", "backpacks", "mochila", "mochilas", "f"), Noun("bag", "bags", "bolso", "bolsos", "m"),
    Noun("suitcase", "suitcases", "maleta", "maletas", "f"), Noun("wallet", "wallets", "cartera", "carteras", "f"),
    Noun("belt", "belts", "cinturón", "cinturones", "m"), Noun("knife", "knives", "cuchillo", "cuchillos", "m"),
    Noun("frying pan", "frying pans", "sartén", "sartenes", "f"),
    Noun("kettle", "kettles", "hervidor", "hervidores", "m"), Noun("cup", "cups", "taza", "tazas", "f"),
    Noun("plate", "plates", "plato", "platos", "m"), Noun("lamp", "lamps", "lámpara", "lámparas", "f"),
    Noun("blanket", "blankets", "manta", "mantas", "f"), Noun("cushion", "cushions", "cojín", "cojines", "m"),
    Noun("rug", "rugs", "alfombra", "alfombras", "f"), Noun("clock", "clocks", "reloj", "relojes", "m"),
    Noun("towel", "towels", "toalla", "toallas", "f"), Noun("chair", "chairs", "silla", "sillas", "f"),
    Noun("table", "tables", "mesa", "mesas", "f"), Noun("speaker", "speakers", "altavoz", "altavoces", "m"),
    Noun("tent", "tents", "tienda de campaña", "tiendas de campaña", "f"),
    Noun("bottle", "bottles", "botella", "botellas", "f"), Noun("mat", "mats", "esterilla", "esterillas", "f"),
    Noun("umbrella", "umbrellas", "paraguas", "paraguas", "m"), Noun("glove", "gloves", "guante", "guantes", "m"),
    Noun("pillow", "pillows", "almohada", "almohadas", "f"),
)
COLORS = (
    adj("red", "rojo"), adj("black", "negro"), adj("white", "blanco"), adj("yellow", "amarillo"),
    adj("purple", "morado"), adj("green", "verde"), adj("blue", "azul", "azules"), adj("grey", "gris", "grises"),
    adj("brown", "marrón", "marrones"), adj("orange", "naranja", invariable=True),
    adj("pink", "rosa", invariable=True), adj("navy blue", "azul marino", invariable=True),
)
STATES = (adj("damaged", "dañado"), adj("broken", "roto"), adj("dirty", "sucio"), adj("torn", "rasgado"),
          adj("wet", "mojado"), adj("scratched", "rayado"), adj("stained", "manchado"))
QUALITIES = (adj("comfortable", "cómodo"), adj("soft", "suave"), adj("light", "ligero"), adj("heavy", "pesado"),
             adj("cheap", "barato"), adj("expensive", "caro"), adj("beautiful", "bonito"), adj("small", "pequeño"),
             adj("big", "grande"), adj("long", "largo"), adj("short", "corto"), adj("elegant", "elegante"))
TOO = (adj("small", "pequeño"), adj("big", "grande"), adj("long", "largo"), adj("short", "corto"),
       adj("heavy", "pesado"), adj("tight", "ajustado"), adj("expensive", "caro"))
SIZES = ("S", "M", "L", "XL", "38", "40", "42", "44")
DAYS = (("Monday", "lunes"), ("Tuesday", "martes"), ("Wednesday", "miércoles"), ("Thursday", "jueves"),
        ("Friday", "viernes"), ("Saturday", "sábado"))
NUMBERS = (("two", "dos"), ("three", "tres"), ("four", "cuatro"), ("five", "cinco"), ("six", "seis"),
           ("seven", "siete"), ("eight", "ocho"), ("nine", "nueve"), ("ten", "diez"))
PHRASES = (
    ("Your order has been shipped.", "Su pedido ha sido enviado."),
    ("Your order is out for delivery.", "Su pedido está en reparto."),
    ("Your order has been delivered.", "Su pedido ha sido entregado."),
    ("Your order has been cancelled.", "Su pedido ha sido cancelado."),
    ("Shipping is free for orders over fifty dollars.", "El envío es gratis en pedidos de más de cincuenta dólares."),
    ("Returns are free within thirty days.", "Las devoluciones son gratuitas durante treinta días."),
    ("The package is delayed.", "El paquete está retrasado."),
    ("Where is my package?", "¿Dónde está mi paquete?"),
    ("I need to change my address.", "Necesito cambiar mi dirección."),
    ("The tracking number does not work.", "El número de seguimiento no funciona."),
    ("Can I pay with a gift card?", "¿Puedo pagar con una tarjeta regalo?"),
    ("I would like a refund.", "Quisiera un reembolso."),
    ("Thank you for your order.", "Gracias por su pedido."),
    ("We are sorry for the delay.", "Lamentamos el retraso."),
    ("Please contact customer service.", "Por favor, contacte con atención al cliente."),
    ("Express shipping takes two days.", "El envío exprés tarda dos días."),
)

DEF = {("m", False): "el", ("f", False): "la", ("m", True): "los", ("f", True): "las"}
INDEF = {"m": "un", "f": "una"}
THIS = {("m", False): "este", ("f", False): "esta", ("m", True): "estos", ("f", True): "estas"}

Pair = tuple[str, str]


def _es(text: str) -> str:
    """Capitalise a Spanish sentence, after an opening ``¿`` when there is one."""
    return "¿" + capitalize(text[1:]) if text.startswith("¿") else capitalize(text)


def _n(rng: random.Random) -> tuple[Noun, bool, str, str, str]:
    """A noun, whether plural, the English form, the Spanish form, and the Spanish definite article."""
    noun, pl = pick(rng, NOUNS), rng.random() < 0.4
    return noun, pl, noun.en_pl if pl else noun.en, noun.es_pl if pl else noun.es, DEF[(noun.gender, pl)]


def t_state(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    c, s = pick(rng, COLORS), pick(rng, STATES)
    return (f"The {c.en} {en} {'are' if pl else 'is'} {s.en}.",
            f"{art} {es} {c.form(noun.gender, pl)} {'están' if pl else 'está'} {s.form(noun.gender, pl)}.")


def t_return(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    c = pick(rng, COLORS)
    return f"I want to return the {c.en} {en}.", f"quiero devolver {art} {es} {c.form(noun.gender, pl)}."


def t_have(rng: random.Random) -> Pair:
    noun, pl, en, es, _ = _n(rng)
    c = pick(rng, COLORS)
    return (f"Do you have {'these' if pl else 'this'} {en} in {c.en}?",
            f"¿tienen {THIS[(noun.gender, pl)]} {es} en {c.m}?")


def t_ordered(rng: random.Random) -> Pair:
    noun = pick(rng, NOUNS)
    c = pick(rng, COLORS)
    if rng.random() < 0.4:
        return f"I ordered {a_an(c.en)} {noun.en}.", f"pedí {INDEF[noun.gender]} {noun.es} {c.form(noun.gender, False)}."
    num_en, num_es = pick(rng, NUMBERS)
    return f"I ordered {num_en} {c.en} {noun.en_pl}.", f"pedí {num_es} {noun.es_pl} {c.form(noun.gender, True)}."


def t_where(rng: random.Random) -> Pair:
    noun, pl, en, es, _ = _n(rng)
    c = pick(rng, COLORS)
    if pl:
        return f"Where are my {c.en} {en}?", f"¿dónde están mis {es} {c.form(noun.gender, True)}?"
    return f"Where is my {c.en} {en}?", f"¿dónde está mi {es} {c.form(noun.gender, False)}?"


def t_arrives(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    day_en, day_es = pick(rng, DAYS)
    return (f"The {en} {'arrive' if pl else 'arrives'} on {day_en}.",
            f"{art} {es} {'llegan' if pl else 'llega'} el {day_es}.")


def t_too(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    q = pick(rng, TOO)
    return (f"The {en} {'are' if pl else 'is'} too {q.en}.",
            f"{art} {es} {'son' if pl else 'es'} demasiado {q.form(noun.gender, pl)}.")


def t_very(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    c, q = pick(rng, COLORS), pick(rng, QUALITIES)
    return (f"The {c.en} {en} {'are' if pl else 'is'} very {q.en}.",
            f"{art} {es} {c.form(noun.gender, pl)} {'son' if pl else 'es'} muy {q.form(noun.gender, pl)}.")


def t_new(rng: random.Random) -> Pair:
    noun, pl, en, es, _ = _n(rng)
    new = adj("new", "nuevo")
    if pl:
        return f"We will send you new {en}.", f"le enviaremos {es} {new.form(noun.gender, True)}."
    return f"We will send you a new {en}.", f"le enviaremos {INDEF[noun.gender]} {es} {new.form(noun.gender, False)}."


def t_size(rng: random.Random) -> Pair:
    noun = pick(rng, [n for n in NOUNS if n.sized])
    pl = rng.random() < 0.4
    c, size = pick(rng, COLORS), pick(rng, SIZES)
    art, en, es = DEF[(noun.gender, pl)], noun.en_pl if pl else noun.en, noun.es_pl if pl else noun.es
    if pl:
        return (f"Are the {c.en} {en} available in size {size}?",
                f"¿{art} {es} {c.form(noun.gender, True)} están disponibles en la talla {size}?")
    return (f"Is the {c.en} {en} available in size {size}?",
            f"¿{art} {es} {c.form(noun.gender, False)} está disponible en la talla {size}?")


def t_exchange(rng: random.Random) -> Pair:
    noun = pick(rng, [n for n in NOUNS if n.sized])
    pl = rng.random() < 0.4
    bigger = rng.random() < 0.5
    art, en, es = DEF[(noun.gender, pl)], noun.en_pl if pl else noun.en, noun.es_pl if pl else noun.es
    return (f"Can I exchange the {en} for a {'bigger' if bigger else 'smaller'} size?",
            f"¿puedo cambiar {art} {es} por una talla más {'grande' if bigger else 'pequeña'}?")


def t_days(rng: random.Random) -> Pair:
    num_en, num_es = pick(rng, NUMBERS)
    if rng.random() < 0.3:
        return f"Your order will arrive in {num_en} days.", f"su pedido llegará en {num_es} días."
    noun, pl, en, es, _ = _n(rng)
    c = pick(rng, COLORS)
    return (f"Your {c.en} {en} will arrive in {num_en} days.",
            f"{'sus' if pl else 'su'} {es} {c.form(noun.gender, pl)} {'llegarán' if pl else 'llegará'} en {num_es} días.")


def t_costs(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    c, price = pick(rng, COLORS), rng.randint(12, 199)
    return (f"The {c.en} {en} {'cost' if pl else 'costs'} {price} dollars.",
            f"{art} {es} {c.form(noun.gender, pl)} {'cuestan' if pl else 'cuesta'} {price} dólares.")


def t_refund(rng: random.Random) -> Pair:
    amount = rng.randint(12, 450)
    return f"Your refund of {amount} dollars has been issued.", f"su reembolso de {amount} dólares ha sido emitido."


def t_prefer(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    c1, c2 = rng.sample(COLORS, 2)
    g = noun.gender
    return (f"I like the {c1.en} {en} more than the {c2.en} {'ones' if pl else 'one'}.",
            f"me {'gustan' if pl else 'gusta'} más {art} {es} {c1.form(g, pl)} que {art} {c2.form(g, pl)}.")


def t_not_arrived(rng: random.Random) -> Pair:
    noun, pl, en, es, _ = _n(rng)
    c = pick(rng, COLORS)
    if pl:
        return (f"My {c.en} {en} have not arrived yet.",
                f"mis {es} {c.form(noun.gender, True)} todavía no han llegado.")
    return f"My {c.en} {en} has not arrived yet.", f"mi {es} {c.form(noun.gender, False)} todavía no ha llegado."


def t_stock(rng: random.Random) -> Pair:
    noun, pl, en, es, art = _n(rng)
    c, out = pick(rng, COLORS), adj("out of stock", "agotado")
    return (f"The {c.en} {en} {'are' if pl else 'is'} out of stock.",
            f"{art} {es} {c.form(noun.gender, pl)} {'están' if pl else 'está'} {out.form(noun.gender, pl)}.")


def t_phrase(rng: random.Random) -> Pair:
    return pick(rng, PHRASES)


TEMPLATES: tuple[Callable[[random.Random], Pair], ...] = (
    t_state, t_return, t_have, t_ordered, t_where, t_arrives, t_too, t_very, t_new, t_size, t_exchange, t_days,
    t_costs, t_refund, t_prefer, t_not_arrived, t_stock, t_phrase,
)


def make_prompt(en: str) -> str:
    return f"Translate English to Spanish.\nEnglish: {en}\nSpanish:"


def generate_translations(seed: int, n: int, val_fraction: float, test_fraction: float) -> Iterator[dict[str, Any]]:
    """``n`` rows ``{"id", "en", "es", "prompt", "completion", "split"}`` with distinct English sentences."""
    rng = rng_for(seed, "translation")
    pairs: dict[str, str] = {}
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"translation: could not make {n} distinct sentences")
        en, es = pick(rng, TEMPLATES)(rng)
        pairs.setdefault(en, _es(es))
    order = list(pairs)
    rng_for(seed, "translation-split").shuffle(order)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    for i, en in enumerate(order):
        split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
        es = pairs[en]
        yield {"id": f"translation-{i:06d}", "en": en, "es": es, "prompt": make_prompt(en), "completion": f" {es}",
               "split": split}
