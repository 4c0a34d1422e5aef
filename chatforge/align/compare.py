"""An aligned model against its parent on the same held-out prompts: length, KL, reward-model win rate.

Alignment often just lengthens answers, drifts far from the supervised model, or wins by a
reward model's lights and nothing else, so every aligned model's test reports, beside the
checks:

- ``answer_tokens`` and ``parent_answer_tokens``: mean length of the greedy answers;
- ``kl_from_parent``: KL(π ‖ π_parent) per answer token, exact at each position (the sum over
  the vocabulary), averaged over the positions of the aligned model's own held-out answers;
- ``rm_win_rate`` over ``rm_judged`` prompts: the share on which the run's reward model scores
  the aligned model's answer above the parent's (ties count half), when a reward model of the
  same tokenizer exists. A scalar reward model scores each answer alone, so the order the two
  are shown in cannot matter.

The parent's answers are the ones its own test wrote (``answers.jsonl``, matched by location),
so nothing is generated twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatforge.chat.template import render
from chatforge.train.stage import StageContext


def held_out_answers(ctx: StageContext, m: nn.Module, conversations: str, n: int, max_new_tokens: int,
                     frequency_penalty: float) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """An aligned model's greedy answers to ``n`` held-out prompts of ``conversations`` (as SFT's test picks
    them), scored like SFT's (BLEU/chrF, SupportWorld's checks) and against the parent: ``(metrics, details,
    answer rows)``."""
    from chatforge.finetune.sft import evaluate_generation

    gen, rows = evaluate_generation(m, ctx.tokenizer, conversations, n, max_new_tokens, ctx.device, frequency_penalty)
    metrics = {f"test_{k}" if k in ("bleu", "chrf", "status_correct") or k.startswith("check_") else k: v
               for k, v in gen.items() if isinstance(v, int | float)}
    details = {k: v for k, v in gen.items() if not isinstance(v, int | float)}
    parent = parent_checks(ctx, rows)
    if parent:
        details["parent_checks"] = parent
    if ctx.parent is not None:
        versus = versus_parent(m, ctx.tokenizer, rows, ctx.parent.path, ctx.run.root, ctx.precision)
        metrics.update({f"test_{k}": v for k, v in versus.items()})
    return metrics, details, rows


def parent_checks(ctx: StageContext, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The parent's ``test_check_*`` rates on the same prompts as ``rows`` (this model's checked test answers),
    from the parent's own ``answers.jsonl``; {} when it lacks any of them (e.g. another test set)."""
    from chatforge.eval.checks import CHECKS, summarize

    ours = {r["where"] for r in rows if r.get("checks")}
    if ctx.parent is None or not ours:
        return {}
    theirs = {r["where"]: r["checks"] for r in _read_rows(ctx.parent.path.parent / "answers.jsonl")
              if r.get("checks")}
    if not ours <= set(theirs):
        return {}
    report = summarize(("", theirs[w]) for w in sorted(ours))["checks"]
    return {f"test_check_{k}": report[k]["rate"] for k in (*CHECKS, "all") if report[k]["n"]}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _answer_ids(prompt: list[dict[str, Any]], answer: str, tok: Any) -> tuple[list[int], int]:
    """Ids of prompt + answer (with its ``<|end|>``) and where the answer starts."""
    start = len(render(prompt, tok, add_generation_prompt=True).ids)
    return render([*prompt, {"role": "assistant", "content": answer}], tok).ids, start


@torch.no_grad()
def kl_per_token(policy: nn.Module, parent: nn.Module, seqs: list[tuple[list[int], int]], precision: Any) -> float:
    """Mean over answer positions of KL(policy ‖ parent) of the next-token distributions."""
    total, count = 0.0, 0
    block = policy.config.block_size
    for ids, start in seqs:
        ids = ids[:block]
        if start >= len(ids):
            continue
        x = torch.tensor([ids[:-1]], device=next(policy.parameters()).device)
        with precision.autocast():
            lp = torch.log_softmax(policy(x)[0].float(), -1)[0, start - 1:]
            lq = torch.log_softmax(parent(x)[0].float(), -1)[0, start - 1:]
        total += float((lp.exp() * (lp - lq)).sum())
        count += lp.shape[0]
    return total / max(count, 1)


def versus_parent(policy: nn.Module, tok: Any, rows: list[dict[str, Any]], parent_dir: Path, run_root: Path,
                  precision: Any) -> dict[str, float]:
    """The comparison metrics (module docstring) for the aligned model's test ``rows`` (``evaluate_generation``'s)."""
    from chatforge.align.reward import load_reward_model, require_same_tokenizer, score_answers
    from chatforge.train.checkpoint import load_model

    answered = [r for r in rows if r.get("answer") is not None]
    if not answered:
        return {}
    parent_rows = {r["where"]: r["answer"] for r in _read_rows(Path(parent_dir).parent / "answers.jsonl")
                   if r.get("answer") is not None}
    seqs = [_answer_ids(r["prompt"], r["answer"], tok) for r in answered]
    out: dict[str, float] = {"answer_tokens": sum(len(s) - start for s, start in seqs) / len(seqs)}
    device = next(policy.parameters()).device
    parent, _, _ = load_model(Path(parent_dir), device)
    parent.eval()
    out["kl_from_parent"] = kl_per_token(policy, parent, seqs, precision)
    del parent
    both = [r for r in answered if r["where"] in parent_rows]
    if both:
        out["parent_answer_tokens"] = sum(len(_answer_ids(r["prompt"], parent_rows[r["where"]], tok)[0])
                                          - _answer_ids(r["prompt"], "", tok)[1] for r in both) / len(both)
    reward_dir = run_root / "align" / "reward" / "model"
    if both and (reward_dir / "config.json").is_file():
        require_same_tokenizer(reward_dir, Path(parent_dir))
        rm, rm_tok = load_reward_model(reward_dir, device)
        ours = score_answers(rm, rm_tok, [(r["prompt"], r["answer"]) for r in both])
        theirs = score_answers(rm, rm_tok, [(r["prompt"], parent_rows[r["where"]]) for r in both])
        judged = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
        if judged:
            out["rm_win_rate"] = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in judged) / len(judged)
            out["rm_judged"] = len(judged)
    return out
