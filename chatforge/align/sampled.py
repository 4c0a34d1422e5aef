"""Preference pairs from a model's own samples, judged by reward functions (on-policy pairs for DPO).

For each prompt, ``samples`` answers are drawn from the model (one batched KV-cache call per
chunk of prompts) and scored by the reward functions (``align/rewards.py``: SupportWorld's
checks by default, a reward model, or the user's); the best-scored answer becomes ``chosen``
and the worst ``rejected``. A prompt whose answers all score the same teaches nothing and is
skipped, counted; an answer no function scores is left out. ``min_gap`` keeps only pairs whose
scores differ by at least that much: a pair that differs by one check in six is mostly
differences no check sees, and teaches DPO those instead. This is rejection-sampled,
on-policy preference data (as in RSO, Liu et al. 2023, and iterative/online DPO): the pairs
show the policy its *own* mistakes (the wrong order number it tends to quote, the request it
tends to misread), which fixed candidate answers written by a generator do not.

The rows are TRL's conversational form, ``{"prompt", "chosen", "rejected", "meta"}``, written
atomically, so ``chatforge align dpo --train FILE`` (or a reward model) reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatforge.align.rewards import CombinedReward
from chatforge.align.rollout import prompt_items
from chatforge.chat.template import parse_assistant, stop_token_ids
from chatforge.errors import ChatforgeError
from chatforge.io import write_jsonl
from chatforge.model.generate import generate_details


@dataclass
class SampledPairStats:
    prompts: int = 0
    pairs: int = 0
    flat: int = 0  # every answer scored the same
    small_gap: int = 0  # best and worst closer than min_gap
    unscored: int = 0  # fewer than 2 answers could be scored
    left_out: int = 0  # prompts too long to answer
    score_gap: float = 0.0  # mean chosen - rejected score over the pairs

    def summary(self) -> str:
        return (f"{self.pairs} pairs from {self.prompts} prompts (mean score gap {self.score_gap:.3f}); skipped: "
                f"{self.flat} whose answers all scored the same, {self.small_gap} whose best and worst scores are "
                f"closer than the minimum gap, {self.unscored} with under 2 scored answers, {self.left_out} too "
                "long to answer")


@torch.no_grad()
def sample_pairs_from_model(model: Any, tok: Any, source: str, reward: CombinedReward, out: Path, samples: int = 4,
                            limit: int = 0, temperature: float = 1.0, top_k: int = 0, max_new_tokens: int = 192,
                            chunk: int = 8, seed: int = 0, dtype: str = "auto", min_gap: float = 0.0,
                            say: Any = print) -> SampledPairStats:
    """Write best-vs-worst pairs of ``samples`` sampled answers per prompt of ``source`` to ``out``; with
    ``min_gap`` > 0, only pairs whose scores differ by at least that much."""
    from chatforge.eval.generation import MIN_ROOM

    if samples < 2:
        raise ChatforgeError(f"samples: {samples}; a pair needs at least 2 answers per prompt")
    block = model.config.block_size
    items, left_out = prompt_items(source, tok, block, MIN_ROOM, "align pairs")
    if limit > 0:
        items = items[:limit]
    if not items:
        raise ChatforgeError(f"{source}: no prompts to sample answers to")
    stats = SampledPairStats(prompts=len(items), left_out=left_out)
    stops = stop_token_ids(tok)
    model.eval()
    rows: list[dict[str, Any]] = []
    gaps = 0.0
    for k in range(0, len(items), chunk):
        part = items[k:k + chunk]
        room = min(max_new_tokens, block - max(len(it.ids) for it in part))
        gens = generate_details(model, [it.ids for it in part for _ in range(samples)], room,
                                temperature=temperature, top_k=top_k or None, stop_tokens=stops,
                                seed=seed * 1_000_003 + k, dtype=dtype)
        for j, it in enumerate(part):
            scored = []
            for g in gens[j * samples:(j + 1) * samples]:
                text = parse_assistant(g.tokens, tok)
                value = reward(it.messages, text, g.finish_reason == "stop", it.row, it.where)
                if value is not None and text.strip():
                    scored.append((value, text))
            if len(scored) < 2:
                stats.unscored += 1
                continue
            best = max(scored, key=lambda x: x[0])
            worst = min(scored, key=lambda x: x[0])
            if best[0] == worst[0]:
                stats.flat += 1
                continue
            if best[0] - worst[0] < min_gap:
                stats.small_gap += 1
                continue
            gaps += best[0] - worst[0]
            rows.append({"prompt": it.messages, "chosen": [{"role": "assistant", "content": best[1]}],
                         "rejected": [{"role": "assistant", "content": worst[1]}],
                         "meta": {"where": it.where, "chosen_score": best[0], "rejected_score": worst[0],
                                  "scores": [s for s, _ in scored]}})
        say(f"align pairs: {min(k + chunk, len(items))}/{len(items)} prompts, {len(rows)} pairs")
    stats.pairs = len(rows)
    stats.score_gap = gaps / len(rows) if rows else 0.0
    if not rows:
        raise ChatforgeError(f"{source}: no pairs: {stats.flat} prompts' answers all scored the same, "
                             f"{stats.small_gap} closer than the minimum gap {min_gap}, {stats.unscored} with under 2 "
                             "scored answers (raise --samples or --temperature, lower --min-gap, or check the reward)")
    write_jsonl(out, rows)
    return stats
