"""GRPO: on-policy alignment with programmatic rewards (DeepSeekMath; Dr. GRPO and DAPO's fixes).

Each step samples ``group_size`` answers to each of ``batch_size`` prompts from the current
policy (one batched KV-cache ``generate_details`` call, which also returns each token's
log-probability), scores them with the reward functions (``align/rewards.py``; by default
SupportWorld's checks), and turns each answer's reward into an advantage relative to its
group: A = r − mean(group), divided by the group's standard deviation when
``scale_rewards = "group"`` (GRPO) or not (``"none"``, Dr. GRPO: dividing by a small std
over-weights nearly-solved prompts). The loss is PPO's clipped surrogate per generated
token, −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) with ρ = π(token)/π_old(token) (π_old: the
rollout's own log-probabilities, so ρ starts at 1), averaged over all the step's generated
tokens (DAPO's token-level mean: long answers are not down-weighted per token, the length
bias Dr. GRPO describes). With ``kl_beta`` > 0 a frozen copy of the starting model is kept
and β·KL(π‖π_ref) (the k3 estimator) is added per token; the default 0 keeps one model.

Signals that teach nothing are reported, never hidden: a group whose answers all score the
same has zero advantage, and an answer cut at ``max_new_tokens`` is usually scored low for
a reason the model cannot see. When every group of a step has zero variance, or most
answers were cut, a warning line is printed above the progress bar (the most common silent
failure of RL runs). Answers no reward function can score are masked out of the loss.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from chatforge.align.rewards import CombinedReward
from chatforge.align.rollout import PromptItem, pack_answers, spread, stage_prompts, token_logps
from chatforge.chat.template import parse_assistant, stop_token_ids
from chatforge.config import GRPOConfig
from chatforge.finetune.common import EpochShuffler
from chatforge.model.generate import generate_details
from chatforge.train.dist import DistInfo
from chatforge.train.loop import LossOutput, TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest


def group_advantages(rewards: list[float | None], group_size: int, scale: str) -> tuple[list[float], list[bool], int]:
    """Per answer: advantage, whether it counts (scored), and how many groups had zero variance."""
    adv = [0.0] * len(rewards)
    valid = [r is not None for r in rewards]
    flat = 0
    for g in range(0, len(rewards), group_size):
        scored = [r for r in rewards[g:g + group_size] if r is not None]
        if len(scored) < 2 or max(scored) == min(scored):
            flat += 1
            continue
        mean = sum(scored) / len(scored)
        std = (sum((r - mean) ** 2 for r in scored) / (len(scored) - 1)) ** 0.5
        for k in range(g, min(g + group_size, len(rewards))):
            if rewards[k] is not None:
                a = rewards[k] - mean
                adv[k] = a / (std + 1e-4) if scale == "group" else a
    return adv, valid, flat


class Rollouts:
    """Endless on-policy batches: each ``next`` samples, scores and packs one step's answers.

    Resumable: the prompt order and the step count (which seeds each step's sampling) are its state.
    """

    def __init__(self, policy: nn.Module, tok: Any, items: list[PromptItem], f: GRPOConfig, reward: CombinedReward,
                 precision: Any, dist: DistInfo, reference: nn.Module | None = None, say: Any = print):
        self.policy, self.tok, self.items, self.f, self.reward = policy, tok, items, f, reward
        self.precision, self.dist, self.reference, self.say = precision, dist, reference, say
        self.order = EpochShuffler(len(items), f.seed)
        self.step = 0
        self.stops = stop_token_ids(tok)

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.step = int(state["step"])

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> dict[str, Any]:
        f, G = self.f, self.f.group_size
        chosen = [self.items[i] for i in self.order.take_rank(f.batch_size, self.dist)]
        block = self.policy.config.block_size
        room = min(f.max_new_tokens, block - max(len(it.ids) for it in chosen))
        prompts = [it.ids for it in chosen for _ in range(G)]
        seed = f.seed * 1_000_003 + self.step * 1009 + self.dist.rank
        self.step += 1
        gens = generate_details(self.policy, prompts, room, temperature=f.temperature, top_k=f.top_k or None,
                                stop_tokens=self.stops, seed=seed,
                                dtype="bf16" if self.precision.name == "bf16" else "fp32")
        rewards: list[float | None] = []
        for k, g in enumerate(gens):
            it = chosen[k // G]
            text = parse_assistant(g.tokens, self.tok)
            rewards.append(self.reward(it.messages, text, g.finish_reason == "stop", it.row, it.where))
        adv, valid, flat = group_advantages(rewards, G, f.scale_rewards)
        cut = sum(g.finish_reason == "length" for g in gens)
        if flat == len(chosen):
            self.say(f"warning: grpo step {self.step}: every group's answers got the same reward: no learning "
                     "signal (raise group_size or temperature, or check the reward)")
        if cut > len(gens) / 2:
            self.say(f"warning: grpo step {self.step}: {cut} of {len(gens)} answers were cut at max_new_tokens="
                     f"{room}: they never end their turn (raise max_new_tokens)")
        return self._pack(prompts, gens, adv, valid, rewards, flat, cut)

    def _pack(self, prompts: list[list[int]], gens: list[Any], adv: list[float], valid: list[bool],
              rewards: list[float | None], flat: int, cut: int) -> dict[str, Any]:
        idx, targets = pack_answers(prompts, [g.tokens for g in gens], self.tok.pad_id, valid)
        old = spread([g.logprobs for g in gens], targets)
        n = len(gens)
        batch = {"idx": idx, "targets": targets, "old_logps": old,
                 "advantages": torch.tensor(adv, dtype=torch.float32),
                 "reward_sum": sum(r for r in rewards if r is not None), "scored": sum(valid),
                 "flat_groups": flat, "groups": len(prompts) // self.f.group_size, "cut": cut, "answers": n,
                 "answer_tokens": sum(len(g.tokens) for g in gens)}
        if self.reference is not None:
            batch["ref_logps"] = token_logps(self.reference, batch["idx"], batch["targets"], self.f.temperature,
                                             self.precision, grad=False)
        return batch


def grpo_loss(model: nn.Module, batch: dict[str, Any], f: GRPOConfig, precision: Any) -> LossOutput:
    """The clipped surrogate summed over the step's scored answer tokens (the loop divides by their count)."""
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    mask = targets != -1
    logp = token_logps(model, batch["idx"], targets, f.temperature, precision)
    old = batch["old_logps"].to(device)
    ratio = torch.exp(logp - old) * mask
    a = batch["advantages"].to(device)[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - f.epsilon_low, 1 + f.epsilon_high) * a)
    per_token = -surrogate
    metrics: dict[str, Any] = {}
    if "ref_logps" in batch and f.kl_beta:
        delta = batch["ref_logps"].to(device) - logp
        kl = (torch.exp(delta) - delta - 1) * mask
        per_token = per_token + f.kl_beta * kl
        metrics["kl"] = (kl.detach().sum(), mask.sum())
    n_tok = mask.sum()
    clipped = ((ratio < 1 - f.epsilon_low) | (ratio > 1 + f.epsilon_high)) & mask
    metrics |= {"reward": (batch["reward_sum"], max(1, batch["scored"])),
                "clip_frac": (clipped.sum(), n_tok), "flat_groups": (batch["flat_groups"], batch["groups"]),
                "truncated": (batch["cut"], batch["answers"]), "answer_len": (batch["answer_tokens"], batch["answers"])}
    return LossOutput((per_token * mask).sum(), n_tok, metrics, tokens=int(batch["idx"].numel()))


# --------------------------------------------------------------------------- the stage


def build(ctx: StageContext) -> StageParts:
    """GRPO on the parent (by default the run's chat model) with the configured reward functions."""
    from chatforge.align.compare import held_out_answers

    f: GRPOConfig = ctx.section
    tok, model = ctx.tokenizer, ctx.backbone
    items, skipped = stage_prompts(ctx, "grpo")
    reward = CombinedReward(f.rewards, f.reward_weights, ctx.sources["train"], ctx.run.root,
                            ctx.parent.path if ctx.parent else None)
    reference = None
    if f.kl_beta:
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    rollouts = Rollouts(model, tok, items, f, reward, ctx.precision, ctx.dist, reference, say=ctx.say)

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        metrics: dict[str, Any] = {}
        details: dict[str, Any] = {"rewards": f.rewards, "group_size": f.group_size, "scale_rewards": f.scale_rewards}
        files: dict[str, Any] = {}
        conversations = ctx.sources["test"]
        if f.eval_generate:
            gen, more, rows = held_out_answers(ctx, m, conversations, f.eval_generate, f.max_new_tokens,
                                               f.frequency_penalty)
            metrics.update(gen)
            details.update(more)
            files["answers.jsonl"] = rows
        log = ctx.out.root / "metrics.jsonl"
        if log.is_file():  # the last logged training reward (mean over the logging window)
            lines = [json.loads(x) for x in log.read_text().split("\n") if x.strip()]
            train = [x for x in lines if "reward" in x]
            if train:
                metrics["train_reward_first"] = train[0]["reward"]
                metrics["train_reward_last"] = train[-1]["reward"]
        primary = "test_check_all" if "test_check_all" in metrics else "final_train_loss"
        return StageTest(metrics=metrics, primary=primary, details=details, files=files)

    mean_prompt = sum(len(it.ids) for it in items) / len(items)
    return StageParts(
        model=model, batches=rollouts, loss=lambda m, b: grpo_loss(m, b, f, ctx.precision),
        tokens_per_micro_batch=max(1, round((mean_prompt + f.max_new_tokens) * f.batch_size * f.group_size)),
        test=test, units_per_batch=f.batch_size * f.group_size * f.max_new_tokens / 2,
        meta={"grpo": {"rewards": f.rewards, "group_size": f.group_size, "kl_beta": f.kl_beta}},
        info={"prompts": len(items), "prompts_left_out": skipped},
    )
