"""The reward model: the chat model's backbone with a scalar head, trained on preference pairs.

Bradley–Terry (InstructGPT): for a pair, P(chosen ≻ rejected) = σ(r(x, y_w) − r(x, y_l)),
so the loss is −log σ(r_w − r_l). With ``center_rewards_coefficient`` c > 0 it adds
c·(r_w + r_l)² (TRL's reward centring, Eisenstein et al. 2023), which keeps the scores
near zero so that later stages can add them without an offset.

The score of an answer is read at its end-of-turn token ``<|end|>``: the sequence is the
chat-rendered prompt and answer, right-padded, and the head reads the last real token,
which for a whole answer is its ``<|end|>`` (never a padding position: tested). A pair whose
answer does not fit the context has no end-of-turn token to read, so it is skipped and
counted.

The training data may hold pairs (TRL's rows) or K-way rankings (``{"prompt", "candidates":
[{"text", "rank"}]}``, as SupportWorld's ``candidates`` files), a ranking giving all its
K(K-1)/2 pairs. As InstructGPT trains, a prompt's pairs stay together: a batch holds
``batch_size`` prompts with all their pairs (a ranking's, or the rows sharing that prompt),
and each answer is scored once however many pairs it is in (so a batch costs K sequences per
prompt, and the pairs of one ranking, which are not independent, never spread over epochs
as if they were). ``train_pairs`` draws whole prompts at random until it has that many pairs.

By default the stage reads SupportWorld's ``preferences`` (each prompt's best answer against
each of 3 worse ones, grouped back per prompt): on the tiny preset's 40 steps this scored
79.3% held-out pairwise accuracy on those pairs, against 53.9% when trained on all 6 pairs
of each 4-way ranking (the order among the bad answers costs the budget).

A reward model scores token ids, so it only scores a policy that shares its tokenizer:
``require_same_tokenizer`` refuses another, naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatforge.align.pairs import Pair, by_prompt, load_pairs, sample_groups, sample_pairs
from chatforge.chat.template import render
from chatforge.config import RewardConfig
from chatforge.errors import ChatforgeError
from chatforge.finetune.common import ShuffledBatches
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import GPTWithHead, ScalarHead
from chatforge.train.loop import LossOutput, TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest, same_tokenizer


def collate_scored(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and the attention mask (True = real token) of whole sequences."""
    width = max(len(s) for s in seqs)
    idx = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = s
        mask[i, :len(s)] = True
    return {"idx": torch.from_numpy(idx), "attention_mask": torch.from_numpy(mask)}


def pair_rows(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen sequences, then the rejected ones."""
    return collate_scored([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def collate_groups(groups: list[list[Pair]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each prompt's answers once (right-padded, as ``collate_scored``) and ``pairs`` (P, 2): the rows of each
    pair's better and worse answer. A K-way ranking's K(K-1)/2 pairs cost K sequences, not K(K-1)."""
    seqs: list[list[int]] = []
    index: list[list[int]] = []
    for group in groups:
        row_of: dict[tuple[int, ...], int] = {}
        for p in group:
            pair = []
            for ids in (p.chosen, p.rejected):
                key = tuple(ids)
                if key not in row_of:
                    row_of[key] = len(seqs)
                    seqs.append(ids)
                pair.append(row_of[key])
            index.append(pair)
    batch = collate_scored(seqs, pad_id)
    batch["pairs"] = torch.tensor(index, dtype=torch.long)
    return batch


def reward_loss(model: nn.Module, batch: dict[str, torch.Tensor], center: float = 0.0) -> LossOutput:
    """Bradley–Terry over a micro-batch of pairs: (sum over pairs, pairs, accuracy and margin). The batch is
    ``collate_groups``'s (each sequence once, pairs as row indices) or ``pair_rows``' (chosen rows, then
    rejected)."""
    device = next(model.parameters()).device
    scores = model(batch["idx"].to(device), batch["attention_mask"].to(device))
    if "pairs" in batch:
        pairs = batch["pairs"].to(device)
        chosen, rejected = scores[pairs[:, 0]], scores[pairs[:, 1]]
    else:
        n = scores.numel() // 2
        chosen, rejected = scores[:n], scores[n:]
    n = chosen.numel()
    losses = -F.logsigmoid(chosen - rejected)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    margin = (chosen - rejected).detach()
    return LossOutput(losses.sum(), n, {"accuracy": ((margin > 0).sum(), n), "margin": (margin.sum(), n)},
                      tokens=int(batch["attention_mask"].sum()))


@torch.no_grad()
def pair_margins(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, precision: Any) -> torch.Tensor:
    """(N,) r(chosen) − r(rejected) of every pair, in order."""
    out = []
    with precision.autocast():
        for k in range(0, len(pairs), batch_size):
            b = pair_rows(pairs[k:k + batch_size], pad_id)
            scores = model(b["idx"], b["attention_mask"])
            n = scores.numel() // 2
            out.append((scores[:n] - scores[n:]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _whole(pairs: list[Pair], max_tokens: int) -> tuple[list[Pair], int]:
    """Pairs whose two answers both end inside the context (and so have an end-of-turn token)."""
    kept = [p for p in pairs if len(p.chosen) < max_tokens and len(p.rejected) < max_tokens]
    return kept, len(pairs) - len(kept)


def build(ctx: StageContext) -> StageParts:
    """A reward model on the parent (by default the run's chat model), from preference pairs."""
    f: RewardConfig = ctx.section
    tok, backbone, device = ctx.tokenizer, ctx.backbone, ctx.device
    block = backbone.config.block_size
    sets = {}
    for split in ("train", "val", "test"):
        # block + 1 marks an answer cut at the context: such pairs are dropped below, counted
        pairs, stats = load_pairs(ctx.sources[split], tok, block + 1)
        pairs, cut = _whole(pairs, block + 1)
        ctx.say(f"reward {split}: {stats.summary()}" + (f"; {cut} dropped: an answer does not end inside the "
                                                        f"context (no end-of-turn token to score)" if cut else ""))
        sets[split] = pairs
    if not sets["train"]:
        raise ChatforgeError(f"{ctx.sources['train']}: no usable preference pairs")
    # a prompt's pairs (a ranking, or rows sharing the prompt) stay together in one batch (InstructGPT)
    groups = sample_groups(by_prompt(sets["train"]), f.train_pairs, f.seed)
    train_pairs = sum(len(g) for g in groups)
    held = {s: sample_pairs(sets[s], f.eval_pairs, f.seed) for s in ("val", "test")}
    model = GPTWithHead(backbone, ScalarHead(backbone.config.n_embd, reduce="last")).to(device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        margins = pair_margins(m, held["val"], tok.pad_id, f.batch_size, ctx.precision)
        return {"val_reward_accuracy": float((margins > 0).float().mean()) if len(margins) else 0.0,
                "val_loss": float(-F.logsigmoid(margins).mean()) if len(margins) else 0.0}

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        margins = pair_margins(m, held["test"], tok.pad_id, f.batch_size, ctx.precision)
        q = torch.quantile(margins, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist() if len(margins) else []
        metrics = {"test_reward_accuracy": float((margins > 0).float().mean()),
                   "test_loss": float(-F.logsigmoid(margins).mean()), "test_margin_mean": float(margins.mean()),
                   "test_pairs": len(margins)}
        details = {"margin_quantiles": dict(zip(("p10", "p25", "p50", "p75", "p90"), [round(x, 4) for x in q])),
                   "center_rewards_coefficient": f.center_rewards_coefficient}
        return StageTest(metrics=metrics, primary="test_reward_accuracy", details=details)

    group_tokens = sum(sum(len(s) for s in {tuple(x) for p in g for x in (p.chosen, p.rejected)}) for g in groups)
    return StageParts(
        model=model,
        batches=ShuffledBatches(groups, f.batch_size, f.seed, lambda b: collate_groups(b, tok.pad_id), ctx.dist),
        loss=lambda m, b: reward_loss(m, b, f.center_rewards_coefficient),
        tokens_per_micro_batch=max(1, round(group_tokens / len(groups) * f.batch_size)), evaluate=evaluate,
        test=test, keep_trainable=("head",), units_per_batch=f.batch_size * train_pairs / len(groups),
        info={"train_pairs": train_pairs, "train_prompts": len(groups), "val_pairs": len(held["val"])},
    )


# --------------------------------------------------------------------------- using a reward model


def load_reward_model(directory: Path, device: torch.device | str = "cpu") -> tuple[GPTWithHead, Any]:
    """A saved reward model: ``(model in eval mode, tokenizer)``."""
    from chatforge.train.checkpoint import load_model_weights, load_tokenizer_of, read_model_config

    config = read_model_config(directory)
    if config.get("task") != "reward":
        raise ChatforgeError(f"{directory}: not a reward model (task {config.get('task')!r}); train one with "
                             "`chatforge align reward`")
    backbone = GPT(GPTConfig.from_dict(config["model"], source=str(Path(directory) / "config.json")))
    model = GPTWithHead(backbone, ScalarHead(backbone.config.n_embd, reduce="last"))
    load_model_weights(model, directory)
    return model.to(device).eval(), load_tokenizer_of(directory)


def require_same_tokenizer(reward_dir: Path, policy_dir: Path) -> None:
    """Refuse to score a policy whose tokenizer differs from the reward model's: ids would mean other text."""
    a, b = Path(reward_dir) / "tokenizer", Path(policy_dir) / "tokenizer"
    if not same_tokenizer(a, b):
        raise ChatforgeError(f"the reward model {reward_dir} and the policy {policy_dir} have different tokenizers "
                             f"({a} vs {b}); train the reward model from this policy's run")


@torch.no_grad()
def score_answers(model: nn.Module, tok: Any, items: list[tuple[list[dict[str, Any]], str]], batch_size: int = 16
                  ) -> list[float | None]:
    """The reward of each (prompt messages, answer), read at the answer's ``<|end|>``; None where the
    rendered conversation does not fit the model's context (no end-of-turn token to read)."""
    block = model.backbone.config.block_size
    seqs = [render([*prompt, {"role": "assistant", "content": answer}], tok, where=f"item {i}").ids
            for i, (prompt, answer) in enumerate(items)]
    out: list[float | None] = [None] * len(seqs)
    fits = [i for i, s in enumerate(seqs) if len(s) <= block]
    device = next(model.parameters()).device
    for k in range(0, len(fits), batch_size):
        chunk = fits[k:k + batch_size]
        b = collate_scored([seqs[i] for i in chunk], tok.pad_id)
        scores = model(b["idx"].to(device), b["attention_mask"].to(device)).tolist()
        for i, s in zip(chunk, scores):
            out[i] = float(s)
    return out
