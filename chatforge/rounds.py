"""Feedback rounds (``chatforge round``): the next challenger from what people said, promoted only if not worse.

One round, in order:

1. the champion: ``NAME@champion`` in the registry (when none is promoted yet, the run's newest aligned
   chat model is promoted first, saying so in the alias history);
2. the feedback collected since the champion was trained (``feedback.db``: rankings and thumbs become
   preference pairs, answers rated ``round.min_rating`` or better and thumbed-up answers become SFT
   rows), merged with the data the champion's lineage was trained on, de-duplicated; preference
   pairs that reviewers contradict (A over B and B over A for the same prompt) are dropped. The
   counts and both sets are written to ``rounds/<k>/``;
3. a challenger: DPO from the champion on the merged pairs (``round.dpo_steps``), after SFT from the
   champion on the merged SFT rows when ``round.sft_steps`` > 0, through the usual stages (so each is
   a registered version with its parent);
4. both answer the same held-out support prompts; the SupportWorld checks are compared per prompt
   (paired bootstrap) on the guarded metrics;
5. ``@challenger`` moves to the new model; ``@champion`` moves too only if the challenger is not worse
   on every guarded metric: the lower end of the 95% interval of (challenger - champion) is above
   ``-tolerance`` (a non-inferiority test: a small set cannot promote a model that may be worse).
   The decision and its reasons go into the registry's log and ``rounds/<k>/decision.json``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.config import RunConfig, load_config
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.io import read_jsonl, write_json, write_jsonl
from chatforge.paths import RunPaths
from chatforge.registry import CHALLENGER, CHAMPION, Registry, Version

GUARD_SOURCES = ("checks_mean", "all", "status", "order_number", "name", "intent", "no_leak", "ended")


@dataclass(frozen=True)
class Guard:
    metric: str
    tolerance: float


def parse_guards(specs: list[str]) -> list[Guard]:
    out = []
    for spec in specs:
        name, _, tol = spec.partition(":")
        if name not in GUARD_SOURCES:
            raise ConfigError(f"round.guard: {name!r} is not a guarded metric; choose from {', '.join(GUARD_SOURCES)}")
        try:
            tolerance = float(tol) if tol else 0.0
        except ValueError as e:
            raise ConfigError(f"round.guard: {spec!r}: the tolerance after ':' must be a number") from e
        if tolerance < 0:
            raise ConfigError(f"round.guard: {spec!r}: the tolerance must be >= 0")
        out.append(Guard(name, tolerance))
    if not out:
        raise ConfigError("round.guard: name at least one metric (e.g. checks_mean:0.01)")
    return out


# --------------------------------------------------------------------------- the champion


def champion(reg: Registry, run: RunPaths) -> Version:
    """``NAME@champion``; when none is set, the run's newest aligned chat model, promoted now."""
    current = reg.aliases(run.name).get(CHAMPION)
    if current is not None:
        return reg.get(current)
    aligned = [v for v in reg.list(run.name) if v.record.get("task") == "chat" and v.stage in ("dpo", "ppo", "grpo")]
    chats = aligned or [v for v in reg.list(run.name) if v.record.get("task") == "chat"]
    if not chats:
        raise ChatforgeError(f"round: run {run.name!r} has no registered chat model; run `chatforge pipeline run "
                             f"--name {run.name}` first")
    first = chats[-1]
    reg.set_alias(run.name, CHAMPION, first.version,
                  why=f"round: no champion was promoted; the newest {'aligned' if aligned else 'chat'} model")
    return first


def ancestor(reg: Registry, v: Version, stage: str) -> Version | None:
    """The nearest version of ``stage`` in ``v``'s lineage (``v`` itself included)."""
    seen = set()
    while v is not None and v.version not in seen:
        if v.stage == stage:
            return v
        seen.add(v.version)
        try:
            v = reg.get(v.parent) if v.parent else None
        except ChatforgeError:
            return None
    return None


# --------------------------------------------------------------------------- data


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _as_messages(value: Any) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": "user", "content": str(value)}]


def _answer(value: Any) -> str:
    return value[-1]["content"] if isinstance(value, list) else str(value)


def _since(rows: list[dict[str, Any]], when: _dt.datetime) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        created = (r.get("meta") or {}).get("created_at")
        if created and _dt.datetime.fromisoformat(created).replace(tzinfo=_dt.UTC) > when:
            out.append(r)
    return out


def _read(source: str | None) -> list[dict[str, Any]]:
    if not source or not Path(source).is_file():
        return []
    return [row for _, row in read_jsonl(source)]


def _replayed(previous: list[dict[str, Any]], n_new: int, replay: float, seed: int) -> list[dict[str, Any]]:
    """``replay`` previous rows per new one, drawn at random (seeded); ``replay < 0`` keeps them all."""
    if replay < 0 or len(previous) <= replay * n_new:
        return previous
    import random

    keep = sorted(random.Random(seed).sample(range(len(previous)), round(replay * n_new)))
    return [previous[i] for i in keep]


def build_round_data(feedback: dict[str, list[dict[str, Any]]], previous_sft: list[dict[str, Any]],
                     previous_pairs: list[dict[str, Any]], since: _dt.datetime, replay: float = -1.0,
                     seed: int = 0) -> tuple[list, list, dict[str, Any]]:
    """The next SFT rows and preference pairs: the feedback since ``since`` + the previous data (``replay``
    previous rows per new row, drawn at random; < 0 = all of it), without repeats; pairs the reviewers
    contradict are dropped. Returns ``(sft, pairs, counts)``."""
    new_sft, new_pairs = _since(feedback.get("sft", []), since), _since(feedback.get("preferences", []), since)
    counts: dict[str, Any] = {"feedback_sft": len(new_sft), "feedback_pairs": len(new_pairs),
                              "previous_sft": len(previous_sft), "previous_pairs": len(previous_pairs)}
    previous_sft = _replayed(previous_sft, len(new_sft), replay, seed)
    counts["previous_sft_kept"] = len(previous_sft)
    sft, seen = [], set()
    for row in [*previous_sft, *new_sft]:
        k = _key(row["messages"])
        if k not in seen:
            seen.add(k)
            sft.append(row)  # previous rows keep every field the SFT stage may read
    counts["sft"] = len(sft)
    counts["sft_duplicates"] = len(previous_sft) + len(new_sft) - len(sft)

    # one vote per (prompt, answer A, answer B): +1 when A is chosen, -1 when B is
    votes: dict[tuple[str, str, str], int] = {}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in new_pairs:
        prompt = _key(_as_messages(row["prompt"]))
        a, b = _answer(row["chosen"]), _answer(row["rejected"])
        if a == b:
            continue
        key, sign = ((prompt, a, b), 1) if a < b else ((prompt, b, a), -1)
        votes[key] = votes.get(key, 0) + sign
        rows.setdefault(key, {})[sign] = row
    fresh = [rows[k][1 if v > 0 else -1] for k, v in votes.items() if v != 0]
    counts["feedback_pairs_contradicted"] = sum(1 for v in votes.values() if v == 0)
    counts["feedback_pairs_distinct"] = len(fresh)
    previous_pairs = _replayed(previous_pairs, len(fresh), replay, seed)
    counts["previous_pairs_kept"] = len(previous_pairs)
    pairs, seen = [], set()
    for row in [*previous_pairs, *fresh]:
        k = _key([_as_messages(row["prompt"]), _answer(row["chosen"]), _answer(row["rejected"])])
        if k not in seen:
            seen.add(k)
            pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                          **({"meta": row["meta"]} if "meta" in row else {})})
    counts["pairs"] = len(pairs)
    return sft, pairs, counts


# --------------------------------------------------------------------------- comparison


def per_prompt(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each checked answer's guarded figures: ``{id: {metric: 0..1}}`` (``checks_mean`` = share passed)."""
    out = {}
    for r in results:
        checks = {k: v for k, v in (r.get("checks") or {}).items() if v is not None}
        if not checks:
            continue
        fig = {k: float(v) for k, v in checks.items()}
        fig["checks_mean"] = sum(fig.values()) / len(fig)
        fig["all"] = float(all(checks.values()))
        out[str(r["id"])] = fig
    return out


def compare(champ: dict[str, dict[str, float]], chall: dict[str, dict[str, float]], guards: list[Guard],
            seed: int = 0) -> tuple[bool, list[str], dict[str, Any]]:
    """Non-inferiority on each guarded metric, paired by prompt: ``(promote, reasons, figures)``."""
    from chatforge.eval.human import bootstrap_mean

    figures, reasons, promote = {}, [], True
    for g in guards:
        ids = [k for k in champ if k in chall and g.metric in champ[k] and g.metric in chall[k]]
        if not ids:
            promote = False
            reasons.append(f"{g.metric}: no prompt measured on both models")
            continue
        a = [champ[k][g.metric] for k in ids]
        b = [chall[k][g.metric] for k in ids]
        diff, lo, hi = bootstrap_mean([y - x for x, y in zip(a, b)], n_boot=2000, seed=seed)
        ok = lo > -g.tolerance
        promote &= ok
        figures[g.metric] = {"champion": sum(a) / len(a), "challenger": sum(b) / len(b), "diff": diff,
                             "ci95": [lo, hi], "n": len(ids), "tolerance": g.tolerance, "ok": ok}
        reasons.append(f"{g.metric}: {sum(a) / len(a):.3f} -> {sum(b) / len(b):.3f} ({diff:+.3f}, 95% CI "
                       f"{lo:+.3f}..{hi:+.3f}, n {len(ids)}) {'>' if ok else '<='} -{g.tolerance:g}: "
                       + ("not worse" if ok else "may be worse"))
    return promote, reasons, figures


# --------------------------------------------------------------------------- the round


def run_round(cfg: RunConfig, config_path: str | None = None, overrides: list[str] = (), progress: bool = True,
              say: Any = print) -> dict[str, Any]:
    """One round on ``cfg``'s run (see the module docstring); returns the decision record."""
    from chatforge.device import resolve_device
    from chatforge.eval.checks import SupportChecks, evaluate_checks, support_rows
    from chatforge.store.db import Store, default_db_url
    from chatforge.store.export import export_feedback
    from chatforge.train.checkpoint import load_model
    from chatforge.train.stage import run_stage

    rc = cfg.round
    guards = parse_guards(rc.guard)
    run = RunPaths(cfg.run_dir)
    reg = Registry(run.root.parent)
    champ = champion(reg, run)
    champ_dir = reg.path_of(champ.version)
    # round 1 is the pipeline's models; each `chatforge round` is the next
    number = 2 + sum(1 for d in reg.decisions(run.name) if d.get("round"))
    out = run.root / "rounds" / f"{number}"
    say(f"round {number}: champion {run.name}@champion = {champ.version} ({champ.stage}, {champ_dir})")

    # 2. the data
    db = run.feedback_db
    if not db.is_file():
        raise ChatforgeError(f"round: no feedback database at {db}; collect feedback with `chatforge serve "
                             f"--name {run.name}` first (or simulate it: examples/simulate_reviewers.py)")
    counts = export_feedback(Store(default_db_url(run.root)), out / "feedback", ("sft", "preferences"),
                             min_rating=rc.min_rating)
    feedback = {k: _read(str(out / "feedback" / f"{k}.jsonl")) for k in counts}
    since = _dt.datetime.fromisoformat(champ.created_at).replace(tzinfo=_dt.UTC) if champ.created_at else \
        _dt.datetime.min.replace(tzinfo=_dt.UTC)
    sft_v, dpo_v = ancestor(reg, champ, "sft"), ancestor(reg, champ, "dpo")
    prev_sft = _read(((sft_v.record.get("data") or {}).get("train") or {}).get("source") if sft_v else None)
    prev_pairs = _read(((dpo_v.record.get("data") or {}).get("train") or {}).get("source") if dpo_v else None)
    sft_rows, pair_rows, data_counts = build_round_data(feedback, prev_sft, prev_pairs, since, rc.replay, rc.seed)
    new = data_counts["feedback_sft"] + data_counts["feedback_pairs"]
    say(f"round {number}: feedback since {since.isoformat(timespec='seconds')}: {data_counts['feedback_sft']} SFT "
        f"rows, {data_counts['feedback_pairs']} preference pairs ({data_counts['feedback_pairs_contradicted']} "
        f"contradicted by another reviewer, dropped); with {data_counts['previous_sft_kept']} of "
        f"{data_counts['previous_sft']} previous SFT rows and {data_counts['previous_pairs_kept']} of "
        f"{data_counts['previous_pairs']} previous pairs: {data_counts['sft']} SFT rows "
        f"({data_counts['sft_duplicates']} repeats removed), {data_counts['pairs']} pairs")
    if new < rc.min_new:
        raise ChatforgeError(f"round: {new} feedback rows since the champion was trained (round.min_new is "
                             f"{rc.min_new}): nothing to learn from yet")
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "preferences.jsonl", pair_rows)
    write_json(out / "counts.json", data_counts)

    # 3. the challenger, through the ordinary stages
    q = json.dumps
    base = [*overrides, f"name={q(cfg.name)}", f"runs_dir={q(cfg.runs_dir)}"]
    parent_dir = champ_dir
    if rc.sft_steps > 0:
        sft_cfg = load_config(config_path, overrides=[
            *base, f"sft.init_from={q(str(champ_dir))}", f"sft.train_data={q(str(out / 'sft.jsonl'))}",
            f"sft.max_steps={rc.sft_steps}", f"sft.checkpoint_every={rc.sft_steps}", "sft.eval_every=0",
            f"sft.warmup_steps={min(10, rc.sft_steps)}", "sft.eval_generate=0"], preset=cfg.preset)
        ev = run_stage(sft_cfg, "sft", progress=progress)
        parent_dir = reg.path_of(ev["version"])
        say(f"round {number}: SFT {rc.sft_steps} steps from the champion -> {ev['version']}")
    dpo_cfg = load_config(config_path, overrides=[
        *base, f"dpo.init_from={q(str(parent_dir))}", f"dpo.train_data={q(str(out / 'preferences.jsonl'))}",
        f"dpo.max_steps={rc.dpo_steps}", f"dpo.checkpoint_every={rc.dpo_steps}", "dpo.eval_every=0",
        "dpo.train_pairs=0", "dpo.eval_generate=0"], preset=cfg.preset)
    ev = run_stage(dpo_cfg, "dpo", progress=progress)
    chall = reg.get(ev["version"])
    say(f"round {number}: DPO {rc.dpo_steps} steps -> challenger {chall.version}")

    # 4. both on the same held-out prompts
    test = cfg.sft.test_data or str(run.supportworld / "conversations" / "test.jsonl")
    rows = support_rows(test, rc.eval_prompts)
    checks = SupportChecks.for_data(test)
    device = resolve_device(cfg.sft.device)
    results, reports = {}, {}
    for who, v in (("champion", champ), ("challenger", chall)):
        model, tok, _ = load_model(reg.path_of(v.version), device)
        reports[who], res = evaluate_checks(model, tok, rows, checks, cfg.sft.max_new_tokens, device,
                                            frequency_penalty=cfg.sft.frequency_penalty)
        results[who] = per_prompt(res)
        write_jsonl(out / f"answers_{who}.jsonl", res)
        reg.add_eval(v.version, f"round{number}-checks", reports[who])
        del model

    # 5. the decision
    promote, reasons, figures = compare(results["champion"], results["challenger"], guards, seed=rc.seed)
    decision = {"round": number, "decision": "promote" if promote else "keep", "champion": champ.version,
                "challenger": chall.version, "reasons": reasons, "guards": figures, "data": data_counts,
                "feedback_sources": sorted({(r.get("meta") or {}).get("user") or "?" for k in feedback
                                            for r in _since(feedback[k], since)}),
                "prompts": len(rows), "held_out": test}
    reg.record_decision(run.name, decision)
    reg.set_alias(run.name, CHALLENGER, chall.version, why=f"round {number} challenger")
    if promote:
        reg.set_alias(run.name, CHAMPION, chall.version, why=f"round {number}: " + "; ".join(reasons),
                      details={"round": number})
    write_json(out / "decision.json", decision)
    say(f"round {number}: {'PROMOTED' if promote else 'kept the champion'}: " + "; ".join(reasons))
    if cfg.registry.mlflow_uri:
        from chatforge.registry.mlflow_mirror import mirror

        counts = mirror(reg, cfg.registry.mlflow_uri, run.name)["models"].get(run.name, {})
        say(f"mirrored to MLflow {cfg.registry.mlflow_uri}: {counts}")
    return decision
