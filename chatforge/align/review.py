"""Blind reviewer comparison of an aligned model against its parent, through the feedback app.

``queue_comparison`` takes the held-out answers both models' tests already wrote
(``answers.jsonl`` beside each ``model/``, matched by the prompt's location), imports the
shared prompts as a feedback dataset, adds each model's answer as a response (the model's
stage and version are stored, never shown) and assigns one ``rank`` unit per prompt to the
reviewers. The app shows the two answers in an order shuffled per assignment, without model
names: a blind pairwise comparison.

``comparison_result`` reads the rankings back: a judgement is one reviewer's ranking of one
prompt, and the aligned model wins it when its answer is ranked first. The win rate comes
with the number of judgements, a 95% Wilson interval, and the reviewers' agreement on the
prompts two or more of them ranked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from chatforge.errors import ChatforgeError
from chatforge.eval.human import wilson  # its home is eval.human now; still importable from here
from chatforge.store.db import Store
from chatforge.train.checkpoint import model_version, read_model_config


def _answers(model_dir: Path) -> dict[str, dict[str, Any]]:
    """``where -> row`` of the answers a model's stage test wrote beside it."""
    path = Path(model_dir).parent / "answers.jsonl"
    if Path(model_dir).parent.name == "versions":  # an older version kept under versions/: its stage directory
        path = Path(model_dir).parent.parent / "answers.jsonl"
    if not path.is_file():
        raise ChatforgeError(f"{path}: no held-out answers for {model_dir} (its stage's test writes them when "
                             f"eval_generate > 0)")
    rows = {}
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            if isinstance(row.get("answer"), str) and row.get("where"):
                rows[row["where"]] = row
    return rows


def _label(model_dir: Path) -> tuple[str, str]:
    config = read_model_config(model_dir)
    return str(config.get("stage") or Path(model_dir).parent.name), model_version(model_dir)


def parent_of(model_dir: Path) -> Path:
    """The parent directory an aligned model's config.json records (its path is relative to the run)."""
    config = read_model_config(model_dir)
    parent = config.get("parent") or {}
    if not parent.get("path"):
        raise ChatforgeError(f"{model_dir}: records no parent model; name the model to compare with (--against)")
    path = Path(parent["path"])
    if path.is_absolute():
        return path
    for root in Path(model_dir).resolve().parents:  # the path is relative to the run's directory
        if (root / path / "config.json").is_file():
            return root / path
    raise ChatforgeError(f"{model_dir}: its parent {parent['path']} is not found in its run; name the model to "
                         "compare with (--against)")


def queue_comparison(store: Store, aligned_dir: Path, parent_dir: Path, reviewers: list[str], n_prompts: int,
                     overlap: int = 1, name: str | None = None, owner: str | None = None) -> dict[str, Any]:
    """Import the two models' answers to ``n_prompts`` shared held-out prompts and assign them for blind
    ranking; returns the dataset's name and id, how many prompts and assignments."""
    from chatforge.store.service import add_response, assign, import_dataset, list_users

    ours, theirs = _answers(aligned_dir), _answers(parent_dir)
    shared = [w for w in ours if w in theirs and ours[w]["answer"] != theirs[w]["answer"]]
    if not shared:
        raise ChatforgeError(f"{aligned_dir} and {parent_dir} answered no held-out prompt differently: nothing to "
                             "compare")
    shared = shared[:n_prompts] if n_prompts > 0 else shared
    (a_stage, a_version), (p_stage, p_version) = _label(aligned_dir), _label(parent_dir)
    name = name or f"blind {a_stage}@{a_version} vs {p_stage}@{p_version}"
    users = list_users(store)
    admin = next((u for u in users if u["username"] == owner), None) if owner else \
        next((u for u in users if u["role"] == "admin"), None)
    if admin is None:
        raise ChatforgeError(f"no user {owner!r}" if owner else "no admin user to own the comparison: create one "
                             "with `chatforge feedback users add admin --role admin`")
    ds = import_dataset(store, name, "prompts", [{"prompt": ours[w]["prompt"]} for w in shared], admin["id"])
    from chatforge.store.models import Prompt

    with store.session(write=False) as s:
        prompt_ids = list(s.scalars(select(Prompt.id).where(Prompt.dataset_id == ds["id"]).order_by(Prompt.id)))
    for pid, w in zip(prompt_ids, shared):
        add_response(store, pid, a_stage, a_version, ours[w]["answer"])
        add_response(store, pid, p_stage, p_version, theirs[w]["answer"])
    n_assigned = assign(store, ds["id"], "rank", reviewers, overlap)
    return {"dataset": name, "dataset_id": ds["id"], "prompts": len(shared), "assignments": n_assigned,
            "aligned": f"{a_stage}@{a_version}", "parent": f"{p_stage}@{p_version}"}


def comparison_result(store: Store, dataset: str) -> dict[str, Any]:
    """The aligned model's blind win rate on a comparison ``queue_comparison`` made (module docstring)."""
    from chatforge.store.models import Dataset, Prompt, Ranking, Response
    from chatforge.store.service import agreement

    with store.session(write=False) as s:
        ds = s.scalar(select(Dataset).where(Dataset.name == dataset))
        if ds is None:
            raise ChatforgeError(f"no feedback dataset named {dataset!r} (`chatforge align compare queue` makes one)")
        responses = s.execute(select(Response.id, Response.model_id, Response.model_version)
                              .join(Prompt, Prompt.id == Response.prompt_id).where(Prompt.dataset_id == ds.id)).all()
        models = list(dict.fromkeys((m, v) for _, m, v in sorted(responses)))  # by first appearance
        if len(models) != 2:
            raise ChatforgeError(f"dataset {dataset!r} holds answers of {len(models)} models, not the 2 of a "
                                 "blind comparison")
        aligned = models[0]  # queue_comparison adds the aligned model's answer first
        model_of = {rid: (m, v) for rid, m, v in responses}
        orders = list(s.scalars(select(Ranking.order).join(Prompt, Prompt.id == Ranking.prompt_id)
                                .where(Prompt.dataset_id == ds.id)))
        ds_id = ds.id
    wins = sum(1 for order in orders if order and model_of.get(order[0]) == aligned)
    n = len(orders)
    low, high = wilson(wins, n)
    out: dict[str, Any] = {"dataset": dataset, "aligned": "@".join(aligned), "parent": "@".join(models[1]),
                           "judgements": n, "aligned_wins": wins, "win_rate": wins / n if n else None,
                           "interval_95": [low, high] if n else None}
    agree = agreement(store, ds_id)
    if "rank" in agree:
        out["pairwise_agreement"] = agree["rank"]["pairwise_agreement"]
        out["agreement_prompts"] = agree["n_units"]["rank"]
    return out
