"""In-context copying probes: can the model reuse tokens it has just read?

**Copy (induction) probe** (Olsson et al. 2022, "In-context learning and induction
heads"): ``n`` sequences of ``length`` random ordinary tokens, each shown twice after
``<|bos|>``. Random tokens cannot be predicted from the language, so the first copy's
loss is near ``ln(vocab)``; a model with induction heads predicts the second copy by
looking back at what followed the same token before, so its loss on the repeat falls
far below. ``repeat_ratio`` = repeat nll / first-copy nll: about 1 means no copying.
The first token of each copy is left out of both means: nothing in context predicts it.

**Record-lookup probe**: what a support answer needs. A short record lists ``orders``
orders, each an ``SW-`` number with a distinct status, then a sentence asks for the
order in one status: ``The delivered order is SW-``. The loss on that order's digits
(``lookup_nll``) against the loss on digits that are in no record (``lookup_control_nll``,
the same text with the final number replaced) shows whether the model finds the number
in context; ``lookup_top1`` is the share of those digit tokens the model ranks first.

Both are seeded and deterministic, and take a fraction of a second for small models.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from chatforge.model.gpt import GPT

STATUSES = ("processing", "shipped", "delivered", "cancelled", "on hold", "refunded")


def _predict(model: GPT, rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token nll and top-1 token, both (B, T-1), of right-padded rows in eval mode
    (causal attention: the pads change nothing before them)."""
    T = max(len(r) for r in rows)
    device = next(model.parameters()).device
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r)
    x = x.to(device)
    was_training = model.training
    model.eval()
    try:
        logits = model.logits_from_hidden(model.forward_hidden(x[:, :-1]))
    finally:
        model.train(was_training)
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    return nll.float().cpu(), logits.argmax(-1).cpu()


def ordinary_ids(tok: Any) -> torch.Tensor:
    """Ids of every token that is not a special token (what random probe and drill text is drawn from)."""
    return torch.tensor([i for i in range(tok.vocab_size) if not tok.is_special(i)])


@torch.no_grad()
def copy_probe(model: GPT, tok: Any, n: int = 32, length: int = 64, seed: int = 0) -> dict[str, float]:
    """Mean nll on the first copy and on the repeat of ``n`` random sequences (see the module docstring);
    ``length`` shrinks to fit the model's context."""
    L = min(length, (model.config.block_size - 1) // 2)
    if L < 2:
        return {}
    g = torch.Generator().manual_seed(seed)
    ids = ordinary_ids(tok)
    seq = ids[torch.randint(len(ids), (n, L), generator=g)]
    rows = torch.cat([torch.full((n, 1), tok.bos_id), seq, seq], dim=1).tolist()
    nll, _ = _predict(model, rows, tok.pad_id)  # column t predicts token t+1
    first = nll[:, 1:L].mean()  # tokens 2..L of the first copy
    repeat = nll[:, L + 1:2 * L].mean()  # tokens 2..L of the second copy
    return {"first_nll": float(first), "repeat_nll": float(repeat), "repeat_ratio": float(repeat / first),
            "length": float(L)}


def _lookup_rows(tok: Any, rng: random.Random, orders: int) -> tuple[list[int], list[int], list[int]]:
    """(ids with the record's number asked, ids with a number not in the record, positions of its digits)."""
    numbers = ["".join(str(rng.randrange(10)) for _ in range(7)) for _ in range(orders + 1)]
    statuses = rng.sample(STATUSES, orders)
    pieces: list[tuple[str, bool]] = []
    for num, status in zip(numbers, statuses):
        pieces += [("Order SW-", False), (num, False), (f": {status}\n", False)]
    k = rng.randrange(orders)
    ask = [(f"The {statuses[k]} order is SW-", False)]
    ids, control = [tok.bos_id], [tok.bos_id]
    for text, _ in pieces + ask:
        enc = tok.encode(text)
        ids += enc
        control += enc
    start = len(ids)
    ids += tok.encode(numbers[k])
    control += tok.encode(numbers[-1])  # a number that is in no record line
    return ids, control, list(range(start, len(ids)))


@torch.no_grad()
def lookup_probe(model: GPT, tok: Any, n: int = 32, orders: int = 3, seed: int = 0) -> dict[str, float]:
    """nll of the asked order's digits when they are in the record vs when they are not, and how often
    the model ranks the right digit token first (see the module docstring). {} when it does not fit."""
    rng = random.Random(seed)
    cases = [_lookup_rows(tok, rng, orders) for _ in range(n)]
    if max(max(len(a), len(b)) for a, b, _ in cases) > model.config.block_size:
        return {}
    nll, top = _predict(model, [a for a, _, _ in cases] + [b for _, b, _ in cases], tok.pad_id)
    found, control, hits, count = 0.0, 0.0, 0, 0
    for i, (a, b, pos) in enumerate(cases):
        found += float(nll[i, [p - 1 for p in pos]].sum())
        control += float(nll[n + i, [p - 1 for p in range(pos[0], len(b))]].sum())
        hits += sum(int(top[i, p - 1]) == a[p] for p in pos)
        count += len(pos)
    n_control = sum(len(b) - pos[0] for _, b, pos in cases)
    return {"lookup_nll": found / count, "lookup_control_nll": control / n_control, "lookup_top1": hits / count}


def probe(model: GPT, tok: Any, seed: int = 0, n: int = 32) -> dict[str, float]:
    """Both probes, keys prefixed ``probe_`` (what the pre-training stage reports)."""
    out = {**copy_probe(model, tok, n=n, seed=seed), **lookup_probe(model, tok, n=n, seed=seed)}
    return {f"probe_{k}": v for k, v in out.items()}
