"""The packaged multiple-choice task ``supportworld_mc``: product facts of the default SupportWorld.

Built deterministically from the default world (``SupportWorldConfig()``'s seed and
product count), whose product pages are in the pre-training corpus, so a model that
read them can know the answers: each product's material and country of origin, asked
as a sentence to complete with four choices (the right one and three other values of
the same field, drawn from a seeded stream). The file is shipped (``task_data/``);
``tests/test_eval_suite.py`` checks it equals ``build_rows()``, and
``python -m chatforge.eval.supportworld_task`` rewrites it.
"""

from __future__ import annotations

import random
from typing import Any

from chatforge.data.supportworld import world as w

N_PRODUCTS = 100  # products asked about: two questions each -> 200 rows
N_CHOICES = 4
SEED_SALT = "supportworld_mc"


def build_rows(seed: int | None = None, n_products: int = N_PRODUCTS) -> list[dict[str, Any]]:
    """The task's rows: ``{"id", "context", "choices", "gold"}``."""
    from chatforge.config import SupportWorldConfig

    cfg = SupportWorldConfig()
    seed = cfg.seed if seed is None else seed
    products = w.make_products(cfg.n_products, seed)
    rng = random.Random(f"{SEED_SALT}:{seed}")
    materials = sorted({p.material for p in products})
    origins = sorted(w.ORIGINS)
    rows = []
    for p in products[:n_products]:
        for field, pool, context in (
            ("material", materials, f"The {p.name} is made of"),
            ("origin", origins, f"The {p.name} is made in"),
        ):
            right = getattr(p, field)
            wrong = rng.sample([v for v in pool if v != right], N_CHOICES - 1)
            gold = rng.randrange(N_CHOICES)
            choices = [*wrong[:gold], right, *wrong[gold:]]
            rows.append({"id": f"{p.id}-{field}", "context": context, "choices": choices, "gold": gold})
    return rows


if __name__ == "__main__":
    from chatforge.eval.tasks import PACKAGED
    from chatforge.io import write_jsonl

    write_jsonl(PACKAGED / "supportworld_mc.jsonl", build_rows())
