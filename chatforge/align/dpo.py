"""DPO: align the chat model straight from preference pairs (Rafailov et al. 2023).

For a pair (prompt x, chosen y_w, rejected y_l), with log-probabilities summed over the
answer's tokens under the policy (π, being trained) and the reference (r, the model
DPO starts from, frozen):

    h = (log π(y_w|x) − log r(y_w|x)) − (log π(y_l|x) − log r(y_l|x))

and the loss, per ``loss_type`` (TRL's names and formulas, so numbers compare):

- ``sigmoid`` (DPO): −(1−ε)·log σ(βh) − ε·log σ(−βh); ε = ``label_smoothing`` > 0 is
  conservative DPO (cDPO), which assumes a share ε of the labels are flipped;
- ``robust`` (Chowdhury et al. 2024): (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1−2ε), an
  unbiased loss under label noise ε;
- ``hinge`` (SLiC): max(0, 1 − βh);
- ``ipo`` (Azar et al. 2023): (h − 1/(2β))², with log-probabilities *averaged* over the
  answer's tokens (IPO's regulariser is per token; TRL does the same).

The reference's log-probabilities do not change during training, so they are computed
once, before the first step, for every pair the run will use (``ReferenceCache``), and
stored beside the pair: only the policy is in memory while training, and a step costs
one forward and backward of the policy on the pair's two sequences.

With ``rpo_alpha`` > 0 (RPO, Pang et al. 2024; TRL's ``rpo_alpha``) each pair's loss adds
``rpo_alpha`` times the chosen answer's negative log-likelihood per token: plain DPO can
lower the chosen answer's probability too, as long as the rejected one falls faster, and a
small model then forgets how to write the answers it was taught (measured on the tiny
preset: the checks fell with the learning rate); the NLL term holds the chosen answers up.
(TRL averages that term over the batch's tokens, here over each pair's; the same when the
answers are of equal length.)

Logged as TRL logs them: ``rewards/chosen`` = β·(log π(y_w) − log r(y_w)), ``rewards/
rejected`` likewise, ``rewards/margins`` their difference and ``rewards/accuracies`` the
share of pairs whose chosen reward is the higher. With π = r every reward is 0 and the
``sigmoid`` loss is log 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatforge.align.pairs import Pair, load_pairs, sample_pairs
from chatforge.config import DPO_CHOICES, DPOConfig
from chatforge.errors import ChatforgeError
from chatforge.finetune.common import ShuffledBatches
from chatforge.train.loop import LossOutput, TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest

LOSS_TYPES = DPO_CHOICES["loss_type"]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (rewards detached) from (B,) log-probabilities
    (sums over the answer's tokens; for ``ipo``, means)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ChatforgeError(f"dpo: unknown loss_type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# --------------------------------------------------------------------------- batches and log-probabilities


@dataclass(frozen=True)
class ScoredPair:
    """A pair with its reference log-probabilities (sum over the answer, and the answer's token count)."""

    pair: Pair
    ref_chosen: float
    ref_rejected: float


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen answers' rows, then the rejected answers' rows, right-padded: inputs and targets
    (-1 off the answer)."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.start for p in pairs] * 2
    width = max(len(s) for s in seqs) - 1
    idx = np.full((len(seqs), width), pad_id, dtype=np.int64)
    targets = np.full((len(seqs), width), -1, dtype=np.int64)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        idx[i, :len(s) - 1] = s[:-1]
        targets[i, start - 1:len(s) - 1] = s[start:]  # the target at t is token t+1: the answer's tokens
    return {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(targets)}


def answer_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) log-probabilities of each row's answer (sum, or mean with ``average``) and (2B,) token counts."""
    device = next(model.parameters()).device
    idx, targets = batch["idx"].to(device), batch["targets"].to(device)
    ce = model(idx, targets, loss_reduction="none")[1]  # (2B, T) -log p, 0 off the answer
    counts = (targets != -1).sum(1)
    logps = -ce.sum(1)
    return (logps / counts.clamp(min=1) if average else logps), counts


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, average: bool,
                    precision: Any) -> list[tuple[float, float]]:
    """(chosen, rejected) reference log-probabilities of every pair, in order (batched by length)."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen), len(pairs[i].rejected)))
    try:
        with precision.autocast():
            for k in range(0, len(order), batch_size):
                chunk = order[k:k + batch_size]
                logps, _ = answer_logps(model, collate_pairs([pairs[i] for i in chunk], pad_id), average)
                n = len(chunk)
                for j, i in enumerate(chunk):
                    out[i] = (float(logps[j]), float(logps[n + j]))
    finally:
        model.train(was_training)
    return out


def score_pairs(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, average: bool,
                precision: Any) -> list[ScoredPair]:
    refs = reference_logps(model, pairs, pad_id, batch_size, average, precision)
    return [ScoredPair(p, c, r) for p, (c, r) in zip(pairs, refs)]


def pair_batch(scored: list[ScoredPair], pad_id: int) -> dict[str, torch.Tensor]:
    b = collate_pairs([s.pair for s in scored], pad_id)
    b["ref_chosen"] = torch.tensor([s.ref_chosen for s in scored])
    b["ref_rejected"] = torch.tensor([s.ref_rejected for s in scored])
    return b


def dpo_step_loss(model: nn.Module, batch: dict[str, torch.Tensor], f: DPOConfig) -> LossOutput:
    """The loop's loss contract for one micro-batch of pairs: (sum over pairs, pairs, TRL's metrics)."""
    logps, counts = answer_logps(model, batch, average=f.loss_type == "ipo")
    n = batch["ref_chosen"].numel()
    device = logps.device
    losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], batch["ref_chosen"].to(device),
                                        batch["ref_rejected"].to(device), f.beta, f.loss_type, f.label_smoothing)
    metrics = {}
    if f.rpo_alpha:
        per_token = logps[:n] if f.loss_type == "ipo" else logps[:n] / counts[:n].clamp(min=1)
        losses = losses - f.rpo_alpha * per_token  # + alpha * NLL per token of the chosen answer
        metrics["nll_loss"] = ((-per_token).detach().sum(), n)
    metrics |= {"rewards/chosen": (chosen.sum(), n), "rewards/rejected": (rejected.sum(), n),
               "rewards/margins": ((chosen - rejected).sum(), n),
               "rewards/accuracies": ((chosen > rejected).sum(), n)}
    return LossOutput(losses.sum(), n, metrics, tokens=int(batch["idx"].numel()))


@torch.no_grad()
def evaluate_pairs(model: nn.Module, scored: list[ScoredPair], f: DPOConfig, pad_id: int, precision: Any
                   ) -> dict[str, float]:
    """Mean loss, rewards, margin and accuracy of ``model`` on held-out pairs."""
    sums = {"loss": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
            "rewards/accuracies": 0.0}
    with precision.autocast():
        for k in range(0, len(scored), f.batch_size):
            out = dpo_step_loss(model, pair_batch(scored[k:k + f.batch_size], pad_id), f)
            sums["loss"] += float(out.sum)
            for name, (value, _) in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
    n = max(1, len(scored))
    return {k: v / n for k, v in sums.items()}


# --------------------------------------------------------------------------- the stage


def build(ctx: StageContext) -> StageParts:
    """DPO on the parent model (by default the run's SFT model), which is also the reference."""
    from chatforge.align.compare import held_out_answers

    f: DPOConfig = ctx.section
    tok, model = ctx.tokenizer, ctx.backbone
    if f.loss_type not in LOSS_TYPES:
        raise ChatforgeError(f"dpo.loss_type: {f.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    block = model.config.block_size
    max_tokens = min(f.max_len or block + 1, block + 1)
    loaded = {}
    for split in ("train", "val", "test"):
        pairs, stats = load_pairs(ctx.sources[split], tok, max_tokens)
        ctx.say(f"dpo {split}: {stats.summary()}")
        loaded[split] = pairs
    if not loaded["train"]:
        raise ChatforgeError(f"{ctx.sources['train']}: no usable preference pairs")
    train_pairs = sample_pairs(loaded["train"], f.train_pairs, f.seed)
    held = {s: sample_pairs(loaded[s], f.eval_pairs, f.seed) for s in ("val", "test")}
    average = f.loss_type == "ipo"
    n_ref = len(train_pairs) + len(held["val"]) + len(held["test"])
    ctx.say(f"dpo: reference log-probabilities of {n_ref} pairs (computed once; the reference is not kept)")
    scored = {"train": score_pairs(model, train_pairs, tok.pad_id, 2 * f.batch_size, average, ctx.precision)}
    for s in ("val", "test"):
        scored[s] = score_pairs(model, held[s], tok.pad_id, 2 * f.batch_size, average, ctx.precision)

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = evaluate_pairs(m, scored["val"], f, tok.pad_id, ctx.precision)
        return {"val_loss": r["loss"], "val_reward_accuracy": r["rewards/accuracies"],
                "val_reward_margin": r["rewards/margins"]}

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        r = evaluate_pairs(m, scored["test"], f, tok.pad_id, ctx.precision)
        metrics: dict[str, Any] = {"test_loss": r["loss"], "test_reward_accuracy": r["rewards/accuracies"],
                                   "test_reward_margin": r["rewards/margins"],
                                   "test_reward_chosen": r["rewards/chosen"],
                                   "test_reward_rejected": r["rewards/rejected"], "test_pairs": len(scored["test"])}
        details: dict[str, Any] = {"beta": f.beta, "loss_type": f.loss_type}
        files: dict[str, Any] = {}
        conversations = f.eval_conversations or str(ctx.run.supportworld / "conversations" / "test.jsonl")
        if f.eval_generate and _exists(conversations):
            gen, more, rows = held_out_answers(ctx, m, conversations, f.eval_generate, f.max_new_tokens,
                                               f.frequency_penalty)
            metrics.update(gen)
            details.update(more, answers_from=conversations)
            files["answers.jsonl"] = rows
        primary = "test_check_all" if "test_check_all" in metrics else "test_reward_accuracy"
        return StageTest(metrics=metrics, primary=primary, details=details, files=files)

    mean_len = sum(len(p.pair.chosen) + len(p.pair.rejected) for p in scored["train"]) / len(scored["train"])
    return StageParts(
        model=model,
        batches=ShuffledBatches(scored["train"], f.batch_size, f.seed, lambda b: pair_batch(b, tok.pad_id), ctx.dist),
        loss=lambda m, b: dpo_step_loss(m, b, f), tokens_per_micro_batch=max(1, round(mean_len * f.batch_size)),
        evaluate=evaluate, test=test, units_per_batch=f.batch_size,
        meta={"dpo": {"beta": f.beta, "loss_type": f.loss_type, "label_smoothing": f.label_smoothing,
                      "rpo_alpha": f.rpo_alpha}},
        info={"train_pairs": len(scored["train"]), "val_pairs": len(scored["val"])},
    )


def _exists(source: str) -> bool:
    return source.startswith("hf:") or Path(source).is_file()
