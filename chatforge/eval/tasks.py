"""Tasks given as data files: multiple-choice and loglikelihood scoring, lm-evaluation-harness style.

A task is a JSONL file, one example per line, all of one kind:

multiple choice::

    {"context": "The Nordvik Alpine Sweater is made of", "choices": ["merino wool", "linen"], "gold": 0}

``query`` is accepted for ``context`` (lm-eval's usual field name); ``id`` is optional.
Each choice is scored as the continuation ``" " + choice`` (lm-eval's default
``target_delimiter``) given the context. Metrics (as lm-eval's ``multiple_choice``
output type): ``acc`` (the choice with the highest summed log-likelihood is
``gold``), ``acc_norm`` (the log-likelihood divided by the choice's length in
characters, without the delimiter) and ``acc_bytes`` (divided by its UTF-8 length).
Ties go to the first choice (numpy's argmax, as lm-eval).

loglikelihood::

    {"context": "Standard shipping takes", "continuation": " 3 to 5 business days."}

The continuation is scored as given (no delimiter). Metrics (as lm-eval's
``loglikelihood`` output type): ``acc`` (the share of continuations that greedy
decoding would produce), ``perplexity`` (``exp(-mean per-example log-likelihood)``,
lm-eval's definition), plus ``mean_loglik`` and ``token_perplexity``
(``exp(-sum loglik / sum tokens)``).

Tokenisation matches what lm-eval does for an API model (``local-completions``,
``TemplateLM._encode_pair`` in lm-eval 0.4.x): trailing whitespace of the context
moves to the front of the continuation; ``whole = encode(context + continuation)``,
``ctx = encode(context)``, and the continuation's tokens are ``whole[len(ctx):]``;
no BOS is added (lm-eval encodes with ``add_special_tokens=False`` and sends the
ids as the prompt); an empty context becomes ``[BOS]`` (lm-eval's prefix token).
Inputs longer than the model's context are cut on the left, as lm-eval does.
``bos=True`` conditions on BOS as well, the way chatforge's pre-training documents
start; the scores then differ from lm-eval's.

Scoring is batched: examples sorted by length, right-padded (causal attention
means the pads after a row's last token never affect it), one forward pass per
batch, log-softmax gathered at the continuation positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.errors import DataError
from chatforge.io import read_jsonl

TARGET_DELIMITER = " "  # lm-eval's default between context and a choice
TOKENS_PER_BATCH = 8192  # padded tokens per forward pass
PACKAGED = Path(__file__).parent / "task_data"


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair to score."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Example:
    where: str  # "file:line"
    id: str
    context: str
    choices: tuple[str, ...] | None  # multiple choice
    gold: int | None
    continuation: str | None  # loglikelihood

    def requests(self) -> list[Request]:
        if self.choices is not None:
            return [Request(self.context, TARGET_DELIMITER + c) for c in self.choices]
        assert self.continuation is not None
        return [Request(self.context, self.continuation)]


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    kind: str  # "multiple_choice" | "loglikelihood"
    examples: tuple[Example, ...]


def packaged_task(name: str) -> Path:
    """The path of a task file shipped with chatforge (e.g. ``supportworld_mc``)."""
    path = PACKAGED / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in PACKAGED.glob("*.jsonl"))
        raise DataError(f"no packaged task {name!r}; packaged tasks: {', '.join(known)}")
    return path


def resolve_task(spec: str | Path) -> Path:
    """A task file path: an existing file, or the name of a packaged task."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.suffix or "/" in str(spec):
        raise DataError(f"{spec}: no such task file")
    return packaged_task(str(spec))


def _text(rec: dict[str, Any], key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _example(rec: dict[str, Any], where: str, k: int) -> Example:
    if "context" in rec and "query" in rec:
        raise DataError(f"{where}: give 'context' or 'query', not both")
    ctx_key = "context" if "context" in rec else "query" if "query" in rec else None
    if ctx_key is None:
        raise DataError(f"{where}: missing 'context' (or 'query'): the text the answer follows")
    context = _text(rec, ctx_key, where)
    ex_id = str(rec.get("id", k))
    if "choices" in rec:
        if "continuation" in rec:
            raise DataError(f"{where}: a row is multiple choice ('choices', 'gold') or loglikelihood "
                            "('continuation'), not both")
        choices = rec["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if "gold" not in rec:
            raise DataError(f"{where}: missing 'gold' (the index of the right choice)")
        gold = rec["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: 'gold' must be an integer index into 'choices' (0..{len(choices) - 1}), "
                            f"got {gold!r}")
        return Example(where, ex_id, context, tuple(choices), gold, None)
    if "continuation" in rec:
        cont = _text(rec, "continuation", where)
        if not cont:
            raise DataError(f"{where}: 'continuation' is empty: nothing to score")
        return Example(where, ex_id, context, None, None, cont)
    raise DataError(f"{where}: needs 'choices' and 'gold' (multiple choice) or 'continuation' (loglikelihood)")


def load_task(path: str | Path) -> Task:
    """Read and check a task file (see the module docstring); errors name the file and line."""
    path = resolve_task(path)
    examples = []
    kind = None
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        ex = _example(rec, where, len(examples))
        this = "multiple_choice" if ex.choices is not None else "loglikelihood"
        if kind is None:
            kind = this
        elif this != kind:
            raise DataError(f"{where}: a {this} row in a {kind} task (the first row sets the kind; one kind per file)")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples")
    assert kind is not None
    return Task(path.stem, path, kind, tuple(examples))


# --------------------------------------------------------------------------- tokenisation and scoring


def encode_pair(tok: Any, context: str, continuation: str, bos: bool = False) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-eval's ``_encode_pair`` for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        ctx: list[int] = [tok.bos_id]
        cont = tok.encode(continuation)
        return ctx, cont
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    return ([tok.bos_id, *ctx] if bos else ctx), cont


@dataclass(frozen=True)
class Score:
    loglik: float  # sum of the continuation tokens' log-probabilities
    tokens: int
    greedy: bool  # every continuation token has the largest logprob at its position (ties count)


def score_requests(model: torch.nn.Module, tok: Any, requests: list[Request], device: Any = "cpu",
                   bos: bool = False, tokens_per_batch: int = TOKENS_PER_BATCH) -> list[Score]:
    """Log-likelihood of each request's continuation given its context (batched forward passes)."""
    from chatforge.model.generate import lm_logits

    block = model.config.block_size
    seqs: list[tuple[list[int], int]] = []  # (input ids, number of continuation tokens)
    for r in requests:
        ctx, cont = encode_pair(tok, r.context, r.continuation, bos)
        ids = (ctx + cont)[-(block + 1):]  # the last token is a target only: block + 1 ids fit
        seqs.append((ids, min(len(cont), len(ids) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[Score | None] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    k = 0
    with torch.no_grad():
        while k < len(order):
            width = max(len(seqs[order[k]][0]) - 1, 1)
            n = max(1, tokens_per_batch // width)
            chunk = order[k:k + n]
            k += len(chunk)
            x = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = seqs[i][0][:-1]
                x[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logp = torch.log_softmax(lm_logits(model, model.forward_hidden(x.to(device))).float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                ids, n_cont = seqs[i]
                if n_cont == 0:
                    out[i] = Score(0.0, 0, True)
                    continue
                end = len(ids) - 1  # positions 0..end-1 predict ids[1..end]
                pos = torch.arange(end - n_cont, end)
                targets = torch.tensor(ids[len(ids) - n_cont:], dtype=torch.long)
                lp = logp[row, pos]
                chosen = lp.gather(1, targets[:, None])[:, 0]
                # "greedy" as lm-eval reads it from top_logprobs: the token's logprob is the largest there
                # (so a tie for the top counts, where an argmax index might pick the other token)
                greedy = bool((chosen >= lp.max(-1).values).all())
                out[i] = Score(float(chosen.double().sum()), n_cont, greedy)
    model.train(was_training)
    return [s for s in out if s is not None]


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # an untrained model's perplexity can overflow a float


def evaluate_task(model: torch.nn.Module, tok: Any, task: Task | str | Path, device: Any = "cpu",
                  bos: bool = False, limit: int = 0) -> dict[str, Any]:
    """Score a task: ``{"name", "path", "kind", "n", "metrics": {...}, "examples": [...]}``.

    Each example records per choice ``loglik``, ``tokens`` and ``greedy`` (and ``pred``, ``pred_norm``
    for multiple choice), so two scorers (this and lm-eval) can be compared choice by choice."""
    if not isinstance(task, Task):
        task = load_task(task)
    examples = task.examples[:limit] if limit else task.examples
    reqs = [r for ex in examples for r in ex.requests()]
    scores = iter(score_requests(model, tok, reqs, device, bos))
    rows: list[dict[str, Any]] = []
    for ex in examples:
        got = [next(scores) for _ in ex.requests()]
        row: dict[str, Any] = {"id": ex.id, "loglik": [s.loglik for s in got], "tokens": [s.tokens for s in got],
                               "greedy": [s.greedy for s in got]}
        if ex.choices is not None:
            lls = np.array(row["loglik"])
            row["gold"] = ex.gold
            row["pred"] = int(np.argmax(lls))
            row["pred_norm"] = int(np.argmax(lls / np.array([float(len(c)) for c in ex.choices])))
            row["pred_bytes"] = int(np.argmax(lls / np.array([float(len(c.encode("utf-8"))) for c in ex.choices])))
        rows.append(row)
    n = len(rows)
    if task.kind == "multiple_choice":
        metrics = {name: sum(r[key] == r["gold"] for r in rows) / n
                   for name, key in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_bytes", "pred_bytes"))}
    else:
        lls = [r["loglik"][0] for r in rows]
        toks = sum(r["tokens"][0] for r in rows)
        metrics = {"acc": sum(r["greedy"][0] for r in rows) / n, "mean_loglik": sum(lls) / n,
                   "perplexity": _exp(-sum(lls) / n), "token_perplexity": _exp(-sum(lls) / toks) if toks else math.nan}
    return {"name": task.name, "path": str(task.path), "kind": task.kind, "n": n, "bos": bos,
            "metrics": metrics, "examples": rows}
