"""The SupportWorld shop: its policies, product catalogue and customers.

Everything the other generators say about the shop comes from here, so the help
articles, the product pages and the support agent's answers agree with each other
(the return window is always ``RETURN_DAYS``, a product's warranty is the same on
its page and in a chat). The word lists are small and written out by hand.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from chatforge.data.supportworld.text import pick, rng_for

# --------------------------------------------------------------------------- policies

SHOP = "SupportWorld"
SUPPORT_EMAIL = "help@supportworld.example"
SUPPORT_PHONE = "+1 (555) 014-2200"
SUPPORT_HOURS = "8 am to 8 pm Eastern time, Monday to Saturday"
RETURN_DAYS = 30  # days after delivery an item can be returned
REFUND_DAYS = "5 to 10 business days"  # from refund issue to money on the card
FREE_SHIPPING_OVER = 50.0  # order subtotal above which standard shipping is free
CANCEL_WINDOW = "until the order leaves the warehouse"
LOYALTY_TIERS = ("Bronze", "Silver", "Gold")
GIFT_CARD_YEARS = 5
GIFT_CARD_VALUES = (10, 25, 50, 75, 100, 150, 200, 250, 500)
DAMAGE_REPORT_DAYS = 7  # days after delivery to report a damaged or wrong item
PRICE_ADJUST_DAYS = 14  # days after purchase in which a price drop is refunded once
AUTH_RELEASE_DAYS = "3 to 5 business days"  # until a declined or duplicate card authorisation disappears
TRACE_AFTER_DAYS = 5  # business days past the estimate before a carrier trace is opened
LOST_AFTER_DAYS = 10  # business days of trace before a parcel counts as lost (replaced or refunded)
RESET_LINK_MINUTES = 60
EMAIL_REPLY_HOURS = 24
PAYMENT_METHODS = ("Visa", "Mastercard", "American Express", "Discover", "PayPal", "Apple Pay", "a gift card")
NON_RETURNABLE = ("gift cards", "earbuds whose hygiene seal has been broken", "personalised items",
                  "items marked final sale")
# Loyalty: points per dollar spent, yearly spend to reach the tier, shipping perks.
POINTS_PER_DOLLAR = {"Bronze": 1, "Silver": 2, "Gold": 3}
TIER_SPEND = {"Bronze": 0, "Silver": 500, "Gold": 1500}
POINTS_PER_REWARD_DOLLAR = 100  # 100 points = $1 off
FREE_STANDARD_TIERS = ("Silver", "Gold")  # standard shipping free on every order
FREE_EXPRESS_TIERS = ("Gold",)

# What each order status means; the support answers and the help articles use these exact words.
STATUS_MEANINGS = {
    "processing": "the order is confirmed and being packed; it can still be changed or cancelled",
    "on hold": "the payment did not go through, so the order waits until the payment details are updated",
    "shipped": "the parcel has left the warehouse and is with the carrier",
    "out for delivery": "the carrier expects to deliver the parcel today",
    "delayed": "the parcel is past its estimated delivery date and has not arrived yet",
    "delivered": "the carrier has confirmed delivery",
    "cancelled": "the order was cancelled before it left the warehouse and the payment is refunded",
    "return requested": "a return label was issued and the item is on its way back to us",
    "refunded": "the money has been sent back to the original payment method",
}
STATUSES = tuple(STATUS_MEANINGS)


@dataclass(frozen=True)
class ShippingMethod:
    name: str
    cost: float
    min_days: int  # business days from dispatch to delivery
    max_days: int


SHIPPING_METHODS = {
    "economy": ShippingMethod("economy", 2.95, 5, 8),
    "standard": ShippingMethod("standard", 4.95, 3, 5),
    "express": ShippingMethod("express", 12.95, 1, 2),
}



def shipping_cost(method: str, subtotal: float, tier: str) -> float:
    """What an order pays for shipping: the one rule the articles, examples and order records share."""
    if method == "express":
        return 0.0 if tier in FREE_EXPRESS_TIERS else SHIPPING_METHODS["express"].cost
    if tier in FREE_STANDARD_TIERS or subtotal >= FREE_SHIPPING_OVER:
        return 0.0
    return SHIPPING_METHODS[method].cost


# Carrier name -> tracking-number prefix and digit count.
CARRIERS = {"ParcelPoint": ("PP", 10), "SwiftShip": ("SS", 12), "NorthPost": ("NP", 9), "Veloce Express": ("VX", 11)}

# Destinations outside the home market, with delivery days and a flat fee (help articles only).
INTERNATIONAL = {
    "Canada": (5, 9, 14.95), "Mexico": (6, 12, 17.95), "the United Kingdom": (6, 10, 19.95),
    "Ireland": (7, 11, 19.95), "Germany": (6, 10, 19.95), "France": (6, 10, 19.95), "Spain": (7, 12, 19.95),
    "Australia": (9, 15, 24.95), "Japan": (8, 14, 24.95), "New Zealand": (10, 16, 26.95),
}

# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Category:
    key: str
    title: str  # section name in the shop
    nouns: tuple[str, ...]  # what a product of this category is called
    materials: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]  # empty: one size
    dims_cm: tuple[tuple[int, int], ...]  # ranges of length, width, height; empty: not given
    weight_kg: tuple[float, float]
    price: tuple[int, int]
    warranty_months: tuple[int, ...]
    features: tuple[str, ...]
    uses: tuple[str, ...]


APPAREL_SIZES = ("XS", "S", "M", "L", "XL", "XXL")
SHOE_SIZES = ("6", "7", "8", "9", "10", "11", "12")

CATEGORIES: tuple[Category, ...] = (
    Category("tops", "Tops and knitwear", ("sweater", "hoodie", "t-shirt", "cardigan", "polo shirt", "flannel shirt"),
             ("merino wool", "organic cotton", "linen", "recycled polyester", "cashmere blend", "bamboo jersey"),
             ("navy", "charcoal", "oatmeal", "forest green", "burgundy", "white", "black", "sky blue"),
             APPAREL_SIZES, (), (0.2, 0.7), (25, 140), (6, 12),
             ("ribbed cuffs", "a relaxed fit", "flat-lock seams", "a brushed inner face", "a tagless neckline",
              "reinforced shoulder seams", "a longer back hem", "mother-of-pearl buttons"),
             ("layering on cool mornings", "everyday wear", "travel", "weekends at home", "the office")),
    Category("outerwear", "Jackets and coats", ("rain jacket", "parka", "puffer jacket", "fleece jacket", "wool coat",
                                                "windbreaker"),
             ("recycled nylon", "waxed cotton", "wool blend", "softshell", "ripstop polyester", "down-filled nylon"),
             ("black", "olive", "navy", "mustard", "slate grey", "red", "sand"),
             APPAREL_SIZES, (), (0.4, 1.6), (60, 320), (12, 24),
             ("taped seams", "a two-way zip", "an adjustable hood", "zippered hand pockets", "pit zips",
              "a packable design", "a water-repellent finish", "an inner media pocket"),
             ("rainy commutes", "winter walks", "hiking", "city days", "travel")),
    Category("footwear", "Footwear", ("running shoes", "hiking boots", "sneakers", "sandals", "ankle boots", "slippers"),
             ("suede", "full-grain leather", "knit mesh", "canvas", "recycled rubber", "nubuck"),
             ("black", "white", "tan", "grey", "navy", "brown", "olive"),
             SHOE_SIZES, (), (0.5, 1.4), (40, 220), (6, 12),
             ("a cushioned midsole", "a grippy rubber outsole", "a removable insole", "a padded collar",
              "a waterproof membrane", "a wide toe box", "reflective details"),
             ("daily runs", "trail hikes", "long days on your feet", "casual wear", "lounging at home")),
    Category("bags", "Bags and travel", ("backpack", "tote bag", "duffel bag", "messenger bag", "sling bag",
                                         "carry-on suitcase"),
             ("recycled polyester", "waxed canvas", "full-grain leather", "ballistic nylon", "cotton canvas"),
             ("black", "navy", "olive", "tan", "grey", "rust"),
             (), ((30, 60), (15, 35), (35, 55)), (0.4, 3.2), (35, 260), (12, 24, 60),
             ("a padded laptop sleeve", "water-resistant zips", "a luggage pass-through", "hidden back pocket",
              "adjustable shoulder straps", "a bottle pocket on each side", "a clamshell opening"),
             ("commuting", "weekend trips", "the gym", "carry-on travel", "school")),
    Category("kitchen", "Kitchen", ("chef's knife", "frying pan", "kettle", "coffee grinder", "cutting board",
                                    "dutch oven", "French press"),
             ("stainless steel", "cast iron", "carbon steel", "acacia wood", "borosilicate glass", "ceramic"),
             ("black", "silver", "cream", "sage green", "matte white", "copper"),
             (), ((15, 45), (10, 30), (5, 25)), (0.3, 5.5), (20, 240), (12, 24, 60),
             ("an ergonomic handle", "induction compatibility", "a dishwasher-safe body", "a pour spout",
              "a stay-cool handle", "fifteen grind settings", "a non-slip base", "an oven-safe build"),
             ("weeknight dinners", "slow Sunday breakfasts", "small kitchens", "batch cooking", "entertaining")),
    Category("home", "Home", ("table lamp", "throw blanket", "cushion cover", "area rug", "wall clock", "bath towel set"),
             ("linen", "wool", "jute", "brushed brass", "ceramic", "organic cotton", "oak"),
             ("natural", "charcoal", "terracotta", "ivory", "dusty pink", "teal", "mustard"),
             (), ((20, 180), (20, 120), (1, 60)), (0.3, 6.0), (20, 280), (12, 24),
             ("a dimmable bulb", "hand-finished edges", "a hidden zip", "a non-slip backing",
              "a silent sweep movement", "pre-washed softness", "fringed ends"),
             ("living rooms", "bedrooms", "reading corners", "guest rooms", "entryways")),
    Category("electronics", "Electronics", ("wireless earbuds", "bluetooth speaker", "power bank", "smartwatch",
                                            "desk charger", "noise-cancelling headphones"),
             ("aluminium", "recycled plastic", "silicone", "fabric-wrapped", "anodised aluminium"),
             ("black", "white", "graphite", "sand", "midnight blue"),
             (), ((3, 25), (3, 20), (2, 12)), (0.05, 1.1), (25, 320), (12, 24),
             ("up to 30 hours of battery life", "USB-C fast charging", "IPX5 water resistance",
              "active noise cancellation", "multipoint Bluetooth pairing", "a companion app",
              "wireless charging", "a built-in microphone"),
             ("commuting", "workouts", "working from home", "travel", "the desk")),
    Category("outdoor", "Outdoor and camping", ("tent", "sleeping bag", "water bottle", "camping stove", "trekking poles",
                                                "hammock"),
             ("ripstop nylon", "stainless steel", "aluminium", "recycled polyester", "titanium"),
             ("orange", "forest green", "grey", "blue", "yellow", "black"),
             (), ((20, 220), (10, 150), (5, 120)), (0.2, 4.5), (20, 420), (24, 60),
             ("a double-wall build", "colour-coded poles", "a compression sack", "a leak-proof lid",
              "a piezo igniter", "flick-lock adjustment", "a two-door layout"),
             ("weekend camping", "backpacking", "festivals", "day hikes", "the beach")),
    Category("fitness", "Fitness", ("yoga mat", "dumbbell set", "resistance bands", "foam roller", "jump rope",
                                    "kettlebell"),
             ("natural rubber", "TPE foam", "cast iron", "neoprene", "cork", "latex"),
             ("black", "purple", "teal", "grey", "coral", "blue"),
             (), ((10, 185), (10, 70), (1, 30)), (0.2, 20.0), (15, 180), (12, 24),
             ("a non-slip texture", "alignment markings", "a carry strap", "colour-coded resistance levels",
              "a knurled grip", "ball-bearing handles", "an odour-resistant surface"),
             ("home workouts", "yoga classes", "recovery days", "small apartments", "travel")),
)
CATEGORY_BY_KEY = {c.key: c for c in CATEGORIES}

# Where a category's shared materials or features would not fit a product (a glass chef's knife, a desk
# charger with noise cancellation), the noun has its own lists: (materials, features).
NOUN_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chef's knife": (("stainless steel", "carbon steel"),
                     ("a full-tang blade", "an ergonomic handle", "a hand-sharpened edge", "a bolster finger guard")),
    "frying pan": (("cast iron", "carbon steel", "stainless steel", "ceramic"),
                   ("induction compatibility", "a stay-cool handle", "an oven-safe build", "a pour spout")),
    "kettle": (("stainless steel", "borosilicate glass"),
               ("a pour spout", "a stay-cool handle", "a non-slip base", "automatic shut-off")),
    "coffee grinder": (("stainless steel", "ceramic"),
                       ("fifteen grind settings", "a non-slip base", "conical burrs", "a dishwasher-safe hopper")),
    "cutting board": (("acacia wood", "oak"), ("a juice groove", "a non-slip base", "hand-finished edges",
                                               "a reversible design")),
    "dutch oven": (("cast iron", "ceramic"), ("an oven-safe build", "induction compatibility", "a self-basting lid",
                                             "loop handles")),
    "French press": (("borosilicate glass", "stainless steel"), ("a double mesh filter", "a stay-cool handle",
                                                                 "a dishwasher-safe body", "a pour spout")),
    "table lamp": (("brushed brass", "ceramic", "oak"), ("a dimmable bulb", "a linen shade", "a touch switch",
                                                         "a weighted base")),
    "throw blanket": (("wool", "organic cotton", "linen"), ("fringed ends", "pre-washed softness",
                                                          "a herringbone weave", "hand-finished edges")),
    "cushion cover": (("linen", "organic cotton", "wool"), ("a hidden zip", "pre-washed softness",
                                                           "a piped edge", "a reversible design")),
    "area rug": (("wool", "jute", "organic cotton"), ("a non-slip backing", "hand-finished edges", "fringed ends",
                                                     "a low pile")),
    "wall clock": (("oak", "brushed brass", "ceramic"), ("a silent sweep movement", "an easy-read dial",
                                                         "a hidden hanging slot")),
    "bath towel set": (("organic cotton", "linen"), ("pre-washed softness", "a quick-dry weave",
                                                    "hanging loops", "hand-finished edges")),
    "wireless earbuds": (("recycled plastic", "silicone"), ("up to 30 hours of battery life",
                                                           "active noise cancellation", "IPX5 water resistance",
                                                           "multipoint Bluetooth pairing", "wireless charging")),
    "bluetooth speaker": (("fabric-wrapped", "aluminium", "recycled plastic"),
                          ("up to 30 hours of battery life", "IPX5 water resistance", "a built-in microphone",
                           "USB-C fast charging")),
    "power bank": (("aluminium", "recycled plastic"), ("USB-C fast charging", "two output ports",
                                                       "wireless charging", "a battery level display")),
    "smartwatch": (("anodised aluminium", "silicone"), ("a companion app", "IPX5 water resistance",
                                                        "a heart-rate sensor", "wireless charging")),
    "desk charger": (("aluminium", "recycled plastic", "fabric-wrapped"),
                     ("USB-C fast charging", "wireless charging", "three output ports", "a non-slip base")),
    "noise-cancelling headphones": (("recycled plastic", "anodised aluminium"),
                                    ("active noise cancellation", "up to 30 hours of battery life",
                                     "multipoint Bluetooth pairing", "a built-in microphone")),
    "tent": (("ripstop nylon", "recycled polyester"), ("colour-coded poles", "a two-door layout",
                                                       "a compression sack", "taped seams")),
    "sleeping bag": (("ripstop nylon", "recycled polyester"), ("a compression sack", "a draft collar",
                                                              "a two-way zip", "an insulated hood")),
    "water bottle": (("stainless steel", "titanium"), ("a double-wall build", "a leak-proof lid", "a carry loop",
                                                      "a wide mouth")),
    "camping stove": (("stainless steel", "titanium", "aluminium"), ("a piezo igniter", "a wind shield",
                                                                    "a compact folding design")),
    "trekking poles": (("aluminium", "carbon fibre"), ("flick-lock adjustment", "cork grips", "tungsten tips",
                                                       "a compact folding design")),
    "hammock": (("ripstop nylon", "recycled polyester"), ("a compression sack", "tree-friendly straps",
                                                         "a built-in bug net")),
    "yoga mat": (("natural rubber", "TPE foam", "cork"), ("a non-slip texture", "alignment markings",
                                                         "a carry strap", "an odour-resistant surface")),
    "dumbbell set": (("cast iron", "neoprene"), ("a knurled grip", "a storage rack", "hexagonal heads")),
    "resistance bands": (("latex", "natural rubber"), ("colour-coded resistance levels", "a carry bag",
                                                       "a door anchor")),
    "foam roller": (("TPE foam",), ("a textured surface", "a hollow core", "an odour-resistant surface")),
    "jump rope": (("neoprene", "natural rubber"), ("ball-bearing handles", "an adjustable cable",
                                                   "foam grips")),
    "kettlebell": (("cast iron",), ("a wide handle", "a flat base", "a powder-coated finish")),
}

BRANDS = ("Nordvik", "Harbor & Pine", "Alder", "Kestrel", "Lumen", "Brightwater", "Oakridge", "Solstice",
          "Fernway", "Tidewell", "Cobalt Lane", "Marlowe", "Quillon", "Bramble", "Northfield", "Saltmarsh",
          "Vireo", "Copperleaf", "Ashgrove", "Tern", "Halcyon", "Ridgeback", "Wren & Co", "Driftwood")
LINES = ("Alpine", "Harbour", "Summit", "Meridian", "Everyday", "Coastal", "Urban", "Trail", "Classic", "Nomad",
         "Aurora", "Basecamp", "Cascade", "Studio", "Voyager", "Evergreen", "Horizon", "Granite", "Willow",
         "Atlas", "Pioneer", "Cedar", "Breeze", "Orbit", "Juniper", "Tundra", "Mesa", "Sierra", "Lagoon", "Pebble")
ORIGINS = ("Portugal", "Vietnam", "Italy", "Canada", "the USA", "Japan", "Turkey", "India", "Mexico", "Taiwan",
           "Germany", "Peru")


@dataclass(frozen=True)
class Product:
    id: str
    name: str  # "Nordvik Alpine Sweater"
    brand: str
    noun: str  # "sweater"
    category: str  # Category.key
    material: str
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    dims: str  # "42 x 28 x 12 cm", "" when not given
    weight_kg: float
    price: float
    warranty_months: int
    features: tuple[str, ...]
    use: str
    origin: str
    launched: int

    @property
    def cat(self) -> Category:
        return CATEGORY_BY_KEY[self.category]


PLURAL_NOUNS = {"running shoes": "pair", "hiking boots": "pair", "sneakers": "pair", "sandals": "pair",
                "ankle boots": "pair", "slippers": "pair", "wireless earbuds": "pair",
                "noise-cancelling headphones": "pair", "trekking poles": "pair", "resistance bands": "set"}


def singular(noun: str) -> str:
    """A noun phrase that takes singular verbs: ``sweater``, ``pair of running shoes``."""
    unit = PLURAL_NOUNS.get(noun)
    return f"{unit} of {noun}" if unit else noun


def _title(noun: str) -> str:
    return " ".join(w if w[:1].isupper() else w.capitalize() for w in noun.split(" "))


def make_products(n: int, seed: int) -> list[Product]:
    rng = rng_for(seed, "products")
    products: list[Product] = []
    used: set[str] = set()
    while len(products) < n:
        cat = pick(rng, CATEGORIES)
        noun = pick(rng, cat.nouns)
        brand = pick(rng, BRANDS)
        line = pick(rng, LINES)
        name = f"{brand} {line} {_title(noun)}"
        if name in used:  # a second product of the same name gets a model number
            name = f"{name} {rng.randint(2, 9)}"
            if name in used:
                continue
        used.add(name)
        dims = ""
        if cat.dims_cm:
            dims = " x ".join(str(rng.randint(lo, hi)) for lo, hi in cat.dims_cm) + " cm"
        lo, hi = cat.price
        price = round(rng.randint(lo, hi) - rng.choice((0.01, 0.05, 0.51, 1.0)), 2)
        materials, features = NOUN_SPECS.get(noun, (cat.materials, cat.features))
        products.append(Product(
            id=f"P{len(products) + 1:04d}", name=name, brand=brand, noun=noun, category=cat.key,
            material=pick(rng, materials), colors=tuple(rng.sample(cat.colors, rng.randint(2, 4))),
            sizes=cat.sizes, dims=dims, weight_kg=round(rng.uniform(*cat.weight_kg), 2), price=price,
            warranty_months=pick(rng, cat.warranty_months), features=tuple(rng.sample(features, 3)),
            use=pick(rng, cat.uses), origin=pick(rng, ORIGINS), launched=rng.randint(2018, 2024),
        ))
    return products


# --------------------------------------------------------------------------- customers

FIRST_NAMES = ("Maria", "James", "Aisha", "Chen", "Sofia", "Liam", "Priya", "Mateo", "Hannah", "Kwame", "Yuki",
               "Oliver", "Fatima", "Lucas", "Ingrid", "Omar", "Grace", "Diego", "Amara", "Noah", "Elena", "Ravi",
               "Chloe", "Tomás", "Zara", "Ethan", "Leila", "Hugo", "Mei", "Samuel", "Nadia", "Jonas", "Isabel",
               "Kofi", "Ava", "Arjun", "Lucia", "Finn", "Sana", "Daniel", "Rosa", "Malik", "Emma", "Kenji", "Anya",
               "Carlos", "Freya", "Tariq", "Julia", "Dmitri", "Olivia", "Felix", "Imani", "Pablo", "Keiko", "Ruth")
LAST_NAMES = ("Lopez", "Smith", "Khan", "Wang", "Rossi", "Murphy", "Patel", "Garcia", "Schmidt", "Mensah",
              "Tanaka", "Brown", "Haddad", "Silva", "Larsen", "Nasser", "Okafor", "Fernandez", "Kim", "Novak",
              "Dubois", "Iyer", "Walsh", "Costa", "Ahmed", "Jensen", "Moreau", "Chen", "Nguyen", "Kowalski",
              "Andersson", "Reyes", "Mbeki", "Sato", "Cohen", "Baker", "Petrov", "O'Brien", "Rahman", "Torres",
              "Fischer", "Hughes", "Yilmaz", "Bianchi", "Evans", "Ortiz", "Lindqvist", "Adeyemi")
STREETS = ("Elm Street", "Maple Avenue", "Harbor Road", "Cedar Lane", "Oak Drive", "Willow Way", "Park Place",
           "River Road", "Hillcrest Avenue", "Lake Street", "Sunset Boulevard", "Mill Lane", "Church Street",
           "Birch Court", "Spring Street", "Orchard Road")
CITIES = (("Portland", "OR", "972"), ("Austin", "TX", "787"), ("Denver", "CO", "802"), ("Boston", "MA", "021"),
          ("Chicago", "IL", "606"), ("Seattle", "WA", "981"), ("Atlanta", "GA", "303"), ("Phoenix", "AZ", "850"),
          ("Madison", "WI", "537"), ("Raleigh", "NC", "276"), ("San Diego", "CA", "921"), ("Columbus", "OH", "432"),
          ("Nashville", "TN", "372"), ("Minneapolis", "MN", "554"), ("Pittsburgh", "PA", "152"),
          ("Sacramento", "CA", "958"), ("Tucson", "AZ", "857"), ("Burlington", "VT", "054"))
EMAIL_DOMAINS = ("example.com", "mail.example", "inbox.example", "post.example")


@dataclass(frozen=True)
class Customer:
    id: str
    first: str
    last: str
    email: str
    phone: str
    address: str
    city: str
    member_since: dt.date
    tier: str
    email_verified: bool
    two_factor: bool

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def make_customers(n: int, seed: int) -> list[Customer]:
    rng = rng_for(seed, "customers")
    customers: list[Customer] = []
    emails: set[str] = set()
    for i in range(n):
        first, last = pick(rng, FIRST_NAMES), pick(rng, LAST_NAMES)
        local = pick(rng, (f"{first}.{last}", f"{first[0]}{last}", f"{first}{last[0]}", f"{first}_{last}"))
        local = local.lower().replace("'", "").replace("á", "a").replace("ó", "o")
        email = f"{local}@{pick(rng, EMAIL_DOMAINS)}"
        while email in emails:
            email = f"{local}{rng.randint(2, 99)}@{pick(rng, EMAIL_DOMAINS)}"
        emails.add(email)
        city, state, zip3 = pick(rng, CITIES)
        address = f"{rng.randint(2, 990)} {pick(rng, STREETS)}, {city}, {state} {zip3}{rng.randint(10, 99)}"
        since = dt.date(2017, 1, 1) + dt.timedelta(days=rng.randrange(2500))
        customers.append(Customer(
            id=f"C{i + 1:05d}", first=first, last=last, email=email,
            phone=f"+1 (555) 01{rng.randint(0, 9)}-{rng.randint(1000, 9999)}", address=address, city=city,
            member_since=since, tier=rng.choices(LOYALTY_TIERS, weights=(6, 3, 1))[0],
            email_verified=rng.random() < 0.85, two_factor=rng.random() < 0.4,
        ))
    return customers


# --------------------------------------------------------------------------- splits

SPLITS = ("train", "val", "test")


def assign_splits(ids: list[str], rng: random.Random, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split entities (not rows): each id goes to exactly one split; every split gets at least one."""
    order = list(ids)
    rng.shuffle(order)
    n = len(order)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    split = {i: "val" for i in order[:n_val]}
    split.update({i: "test" for i in order[n_val:n_val + n_test]})
    split.update({i: "train" for i in order[n_val + n_test:]})
    return split


def split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many of ``n`` rows go to each split (each at least one)."""
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


@dataclass
class World:
    products: list[Product]
    customers: list[Customer]
    product_split: dict[str, str]
    customer_split: dict[str, str]

    def products_in(self, split: str) -> list[Product]:
        return [p for p in self.products if self.product_split[p.id] == split]

    def customers_in(self, split: str) -> list[Customer]:
        return [c for c in self.customers if self.customer_split[c.id] == split]


def make_world(seed: int, n_products: int, n_customers: int, val_fraction: float, test_fraction: float) -> World:
    products = make_products(n_products, seed)
    customers = make_customers(n_customers, seed)
    return World(
        products=products, customers=customers,
        product_split=assign_splits([p.id for p in products], rng_for(seed, "product-split"), val_fraction,
                                    test_fraction),
        customer_split=assign_splits([c.id for c in customers], rng_for(seed, "customer-split"), val_fraction,
                                     test_fraction),
    )
