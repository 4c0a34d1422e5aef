"""What the on-policy stages (GRPO, PPO) share: their prompts, sampled answers packed for the
loss, and per-token log-probabilities.

An answer is sampled by one batched KV-cache ``generate_details`` call for the whole step (never
a token-at-a-time loop over prompts) and packed beside its prompt: ``idx`` is prompt + answer
shifted by one, ``targets`` is -1 except on the answer's tokens (its ``<|end|>`` included when it
ended its turn), so position t of a row predicts its target t, as in the SFT loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.chat.template import render
from chatforge.errors import ChatforgeError


@dataclass(frozen=True)
class PromptItem:
    where: str  # file:line of the row
    messages: list[dict[str, Any]]  # the prompt, ending with the user's turn
    ids: list[int]  # rendered, with the assistant's generation prompt
    row: dict[str, Any]  # the whole data row (reward functions read its metadata)


def prompt_items(source: str, tok: Any, block: int, min_room: int, stage: str) -> tuple[list[PromptItem], int]:
    """The prompts of a conversations file (its main support question on SupportWorld data, else every
    conversation's last prompt), with the row as metadata; how many were left out for lack of room."""
    from chatforge.data.records import iter_records
    from chatforge.eval.checks import is_support_row, support_prompt

    items, skipped = [], 0
    for where, row in iter_records(source, "train"):
        if is_support_row(row):
            prompt = support_prompt(row)[0]
        else:
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ChatforgeError(f"{where}: {stage} prompts need {{\"messages\": [...]}} rows")
            prompt = msgs[:-1] if msgs[-1].get("role") == "assistant" else msgs
        ids = render(prompt, tok, add_generation_prompt=True, where=where).ids
        if len(ids) + min_room > block:
            skipped += 1
            continue
        items.append(PromptItem(where, prompt, ids, row))
    return items, skipped


def stage_prompts(ctx: Any, stage: str) -> tuple[list[PromptItem], int]:
    """An on-policy stage's training prompts (``prompt_items`` of its train source), said once; an error
    when none is left."""
    from chatforge.eval.generation import MIN_ROOM

    items, skipped = prompt_items(ctx.sources["train"], ctx.tokenizer, ctx.backbone.config.block_size, MIN_ROOM,
                                  stage)
    ctx.say(f"{stage}: {len(items)} prompts" + (f" ({skipped} left out: they leave under {MIN_ROOM} tokens to "
                                                 "answer)" if skipped else ""))
    if not items:
        raise ChatforgeError(f"{ctx.sources['train']}: no prompts to sample answers to")
    return items, skipped


def pack_answers(prompts: list[list[int]], answers: list[list[int]], pad_id: int, keep: list[bool] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, W) inputs and targets of prompt + answer rows, right-padded; a row with ``keep`` False has
    no targets (it is left out of the loss)."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(max(len(s) for s in seqs) - 1, 1)
    idx = np.full((len(seqs), width), pad_id, dtype=np.int64)
    targets = np.full((len(seqs), width), -1, dtype=np.int64)
    for i, (p, a, s) in enumerate(zip(prompts, answers, seqs)):
        idx[i, :len(s) - 1] = s[:-1]
        if a and (keep is None or keep[i]):
            targets[i, len(p) - 1:len(s) - 1] = a
    return torch.from_numpy(idx), torch.from_numpy(targets)


def spread(values: list[list[float]], targets: torch.Tensor) -> torch.Tensor:
    """(N, W) float tensor holding each row's per-answer-token ``values`` at its target positions."""
    out = torch.zeros(targets.shape, dtype=torch.float32)
    for i, v in enumerate(values):
        pos = (targets[i] != -1).nonzero().flatten()
        if len(pos):
            out[i, pos] = torch.tensor(v[:len(pos)], dtype=torch.float32)
    return out


def token_logps(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, temperature: float, precision: Any,
                grad: bool = True) -> torch.Tensor:
    """(B, T) log-probability of each target token at ``temperature`` (0 where the target is -1)."""
    device = next(model.parameters()).device
    idx, targets = idx.to(device), targets.to(device)
    with torch.set_grad_enabled(grad), precision.autocast():
        logits = model(idx)[0].float() / max(temperature, 1e-6)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return lp * (targets != -1)
