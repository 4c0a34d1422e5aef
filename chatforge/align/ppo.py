"""PPO with a KL leash: the policy samples answers, the reward model scores them, a value head
learns what each answer is worth so far, and clipped updates favour the better answers while a
KL penalty keeps the policy near the model it started from (InstructGPT, Ouyang et al. 2022; the
details follow "The N Implementation Details of RLHF with PPO", Huang et al., and TRL's PPO).

A **rollout** samples one answer to each of ``batch_size * rollout_batches`` prompts (one batched
KV-cache ``generate_details`` call) and, without gradients:

1. scores each answer with the reward model, read at its last token (its ``<|end|>`` when it
   ended its turn), plus any reward functions (``ppo.rewards``); an answer cut at
   ``max_new_tokens`` loses ``missing_eos_penalty``; with ``normalize_rewards`` the scores are
   divided by their running std and centred on their running mean over every rollout so far;
2. runs the policy (log-probabilities π_old and values V_old at each answer token) and the
   reference, a frozen copy of the starting model (log-probabilities π_ref);
3. builds per-token rewards r_t = −β·(log π_old − log π_ref) (the k1 KL estimate), plus the
   score at the answer's last token; β is ``kl_coef``, or with ``kl_target`` > 0 the adaptive
   controller of Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after
   each rollout, from the rollout's mean KL per answer;
4. GAE (γ, λ) over the answer's tokens, the answer's end being terminal: advantages A_t and
   returns R_t = A_t + V_old,t; advantages whitened over the rollout's tokens.

Each rollout then gives ``ppo_epochs`` shuffled passes of ``rollout_batches`` mini-batches of
``batch_size`` answers, one optimizer step each, with the loss per answer token (averaged over
the step's tokens by the loop)

    max(−A·ρ, −A·clip(ρ, 1 ± ε)) + vf_coef · ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)

with ρ = π/π_old. The value head (zero-initialised, so early values are 0 and the first
advantages are the rewards themselves) sits on the policy's backbone; the stage saves the
backbone alone, a chat model. ``ppo.replay`` mixes in the pre-training loss (PPO-ptx).

The rollout in progress (its tensors and which mini-batch is next), the KL coefficient and the
score statistics are the batch iterator's state, so a run killed mid-rollout resumes the same
curve.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.align.rewards import CombinedReward
from chatforge.align.rollout import PromptItem, pack_answers, stage_prompts
from chatforge.chat.template import parse_assistant, stop_token_ids
from chatforge.config import PPOConfig
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.finetune.common import EpochShuffler
from chatforge.model.generate import generate_details
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarHead
from chatforge.train.dist import DistInfo
from chatforge.train.loop import LossOutput, TrainResult
from chatforge.train.stage import StageContext, StageParts, StageTest


class PolicyWithValue(nn.Module):
    """The policy GPT and a zero-initialised value head on its final hidden states."""

    def __init__(self, backbone: GPT) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = ScalarHead(backbone.config.n_embd, reduce="none")

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, vocab) fp32 logits and (B, T) fp32 values."""
        logits, _, hidden = self.backbone(idx, return_hidden=True)
        return logits, self.value_head(hidden)


# --------------------------------------------------------------------------- the pieces, by hand-checkable formulas


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) per-token rewards and values; ``mask`` marks each
    row's answer tokens (one contiguous span), after which the episode ends. Returns (advantages,
    returns = advantages + values), both 0 off the mask."""
    mask = mask.to(rewards.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=rewards.dtype)
        next_value = values[:, t + 1] * nxt if t + 1 < T else torch.zeros(B, dtype=rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * nxt * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` shifted to mean 0 and scaled to std 1 over the masked positions (0 elsewhere)."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float,
               cliprange_value: float) -> dict[str, torch.Tensor]:
    """Per-token clipped policy and value losses (0 off ``mask``) and their clip indicators."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return {"policy": pg * m, "value": vf * m,
            "clipped": (((ratio - 1).abs() > cliprange) & mask).float(),
            "value_clipped": (((values - old_values).abs() > cliprange_value) & mask).float()}


class AdaptiveKL:
    """β for the KL reward: fixed, or moved toward ``target`` nats per answer (Ziegler et al. 2019)."""

    def __init__(self, init: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl_per_answer: float, n_answers: int) -> None:
        if self.target > 0:
            error = min(max(kl_per_answer / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_answers / self.horizon


class RunningMoments:
    """Mean and std of every score seen so far (Chan et al.'s parallel update), for reward normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: list[float]) -> None:
        if not xs:
            return
        n, mean = len(xs), sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / n
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 and self.var > 1e-12 else 1.0


# --------------------------------------------------------------------------- scoring


class Scorer:
    """The score of each sampled answer: the reward model's, read at the answer's last token (its
    ``<|end|>`` when it ended its turn), plus the weighted reward functions; None where a reward
    function cannot score it (masked out, never scored 0)."""

    def __init__(self, reward_model: nn.Module | None, functions: CombinedReward | None, tok: Any,
                 precision: Any, batch_size: int = 16) -> None:
        if reward_model is None and functions is None:
            raise ConfigError("ppo: nothing scores the answers (no reward model and no reward functions)")
        self.rm, self.fns, self.tok, self.precision, self.batch_size = reward_model, functions, tok, precision, batch_size

    @torch.no_grad()
    def __call__(self, items: list[PromptItem], gens: list[Any]) -> list[float | None]:
        out: list[float | None] = [0.0] * len(gens)
        if self.rm is not None:
            from chatforge.align.reward import collate_scored

            device = next(self.rm.parameters()).device
            seqs = [it.ids + g.tokens for it, g in zip(items, gens)]
            for k in range(0, len(seqs), self.batch_size):
                b = collate_scored(seqs[k:k + self.batch_size], self.tok.pad_id)
                with self.precision.autocast():
                    scores = self.rm(b["idx"].to(device), b["attention_mask"].to(device)).float().tolist()
                for j, s in enumerate(scores):
                    out[k + j] = s
        if self.fns is not None:
            for i, (it, g) in enumerate(zip(items, gens)):
                value = self.fns(it.messages, parse_assistant(g.tokens, self.tok), g.finish_reason == "stop", it.row,
                                 it.where)
                out[i] = None if value is None else (out[i] or 0.0) + value
        return out


# --------------------------------------------------------------------------- rollouts as the loop's batches


class PPORollouts:
    """Endless PPO mini-batches: each rollout is sampled, scored and turned into advantages, then served
    as ``ppo_epochs`` shuffled passes of ``rollout_batches`` mini-batches (see the module docstring)."""

    def __init__(self, policy: PolicyWithValue, reference: nn.Module, scorer: Scorer, tok: Any,
                 items: list[PromptItem], f: PPOConfig, precision: Any, dist: DistInfo, say: Any = print) -> None:
        self.policy, self.reference, self.scorer, self.tok, self.items = policy, reference, scorer, tok, items
        self.f, self.precision, self.dist, self.say = f, precision, dist, say
        self.order = EpochShuffler(len(items), f.seed)
        self.kl = AdaptiveKL(f.kl_coef, f.kl_target, f.kl_horizon)
        self.moments = RunningMoments()
        self.rollouts = 0  # rollouts sampled so far (seeds the sampling and the mini-batch order)
        self.buffer: dict[str, Any] | None = None
        self.cursor = 0  # the next mini-batch of the buffer's schedule
        self.stops = stop_token_ids(tok)

    # resumable: everything a killed run needs to serve the same next mini-batch
    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict(), "rollouts": self.rollouts, "cursor": self.cursor,
                "kl_coef": self.kl.value, "moments": [self.moments.mean, self.moments.var, self.moments.count],
                "buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.rollouts, self.cursor, self.kl.value = int(state["rollouts"]), int(state["cursor"]), state["kl_coef"]
        self.moments.mean, self.moments.var, self.moments.count = state["moments"]
        self.buffer = state["buffer"]

    def __iter__(self) -> PPORollouts:
        return self

    def _schedule(self) -> list[list[int]]:
        f = self.f
        n = f.batch_size * f.rollout_batches
        out = []
        for epoch in range(f.ppo_epochs):
            perm = np.random.default_rng([f.seed, self.rollouts, epoch, self.dist.rank]).permutation(n)
            out += [perm[k * f.batch_size:(k + 1) * f.batch_size].tolist() for k in range(f.rollout_batches)]
        return out

    def __next__(self) -> dict[str, Any]:
        schedule = self._schedule() if self.buffer is not None else []
        if self.buffer is None or self.cursor >= len(schedule):
            self.buffer = self.rollout()
            self.cursor = 0
            schedule = self._schedule()
        rows = schedule[self.cursor]
        self.cursor += 1
        return self._mini_batch(rows)

    @torch.no_grad()
    def rollout(self) -> dict[str, Any]:
        """Sample, score and evaluate one rollout (module docstring, steps 1-4)."""
        f = self.f
        chosen = [self.items[i] for i in self.order.take_rank(f.batch_size * f.rollout_batches, self.dist)]
        block = self.policy.backbone.config.block_size
        room = min(f.max_new_tokens, block - max(len(it.ids) for it in chosen))
        seed = f.seed * 1_000_003 + self.rollouts * 1009 + self.dist.rank
        self.rollouts += 1
        gens = generate_details(self.policy.backbone, [it.ids for it in chosen], room, temperature=f.temperature,
                                top_k=f.top_k or None, stop_tokens=self.stops, seed=seed,
                                dtype="bf16" if self.precision.name == "bf16" else "fp32")
        raw = self.scorer(chosen, gens)
        cut = [g.finish_reason == "length" for g in gens]
        scores = [None if s is None else s - (f.missing_eos_penalty if c else 0.0) for s, c in zip(raw, cut)]
        valid = [s is not None for s in scores]
        if f.normalize_rewards:
            self.moments.update([s for s in scores if s is not None])
        normed = [0.0 if s is None else (s - self.moments.mean) / self.moments.std if f.normalize_rewards else s
                  for s in scores]
        if sum(cut) > len(gens) / 2:
            self.say(f"warning: ppo rollout {self.rollouts}: {sum(cut)} of {len(gens)} answers were cut at "
                     f"max_new_tokens={room}: they never end their turn (raise max_new_tokens)")

        idx, targets = pack_answers([it.ids for it in chosen], [g.tokens for g in gens], self.tok.pad_id, valid)
        mask = targets != -1
        device = next(self.policy.parameters()).device
        was_training = self.policy.training
        self.policy.eval()  # no dropout: the loss's first pass over this rollout gives ratio 1
        try:
            with self.precision.autocast():
                logits, values = self.policy(idx.to(device))
                ref_logits = self.reference(idx.to(device))[0]
        finally:
            self.policy.train(was_training)
        logp = _gather_logps(logits, targets.to(device), f.temperature).cpu()
        ref_logp = _gather_logps(ref_logits, targets.to(device), f.temperature).cpu()
        values = values.float().cpu() * mask
        del logits, ref_logits
        kl = (logp - ref_logp) * mask
        beta = self.kl.value
        rewards = -beta * kl
        last = mask.long().cumsum(1).argmax(1)  # each row's last answer position (its first maximum)
        for i, s in enumerate(normed):
            if valid[i] and mask[i].any():
                rewards[i, last[i]] += s
        advantages, returns = gae(rewards, values, mask, f.gamma, f.lam)
        if f.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        n_valid = max(1, sum(valid))
        kl_per_answer = float(kl.sum()) / n_valid
        self.kl.update(kl_per_answer, len(gens))
        stats = {"score": sum(s for s in scores if s is not None) / n_valid, "kl": kl_per_answer, "kl_coef": beta,
                 "answer_len": sum(len(g.tokens) for g in gens) / len(gens), "truncated": sum(cut) / len(gens),
                 "scored": sum(valid) / len(gens)}
        return {"idx": idx, "targets": targets, "old_logps": logp, "old_values": values,
                "advantages": advantages, "returns": returns, "stats": stats}

    def _mini_batch(self, rows: list[int]) -> dict[str, Any]:
        b = self.buffer
        assert b is not None
        mask = b["targets"][rows] != -1
        width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1  # trim the rows' trailing padding
        out = {k: b[k][rows, :width] for k in ("idx", "targets", "old_logps", "old_values", "advantages", "returns")}
        out["stats"] = b["stats"]
        return out


def _gather_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    lp = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    return lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -1)


def ppo_loss(model: nn.Module, batch: dict[str, Any], f: PPOConfig) -> LossOutput:
    """The loop's loss contract for one mini-batch: per-token policy + value losses summed, over the
    answer tokens; the rollout's statistics logged beside them."""
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    mask = targets != -1
    logits, values = model(batch["idx"].to(device))
    scaled = logits.float() / max(f.temperature, 1e-6)
    logprobs = torch.log_softmax(scaled, dim=-1)
    logp = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    parts = ppo_losses(logp, batch["old_logps"].to(device), batch["advantages"].to(device), values.float(),
                       batch["old_values"].to(device), batch["returns"].to(device), mask, f.cliprange,
                       f.cliprange_value)
    per_token = parts["policy"] + f.vf_coef * parts["value"]
    n = mask.sum()
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1) * mask
        approx_kl = 0.5 * (logp - batch["old_logps"].to(device)) ** 2 * mask
    s = batch["stats"]
    metrics: dict[str, Any] = {
        "policy_loss": (parts["policy"].detach().sum(), n), "value_loss": (parts["value"].detach().sum(), n),
        "clip_frac": (parts["clipped"].sum(), n), "value_clip_frac": (parts["value_clipped"].sum(), n),
        "entropy": (entropy.sum(), n), "approx_kl": (approx_kl.sum(), n),
        **{k: (v, 1) for k, v in s.items()},
    }
    return LossOutput(per_token.sum(), n, metrics, tokens=int(batch["idx"].numel()))


# --------------------------------------------------------------------------- the stage


def reward_model_dir(cfg: Any, value: str) -> Path | None:
    """The reward model ``ppo.reward_model`` names: a stage of the run (``reward``), a directory, or None."""
    from chatforge.paths import RunPaths
    from chatforge.stages import TRAINING_STAGES, get_stage

    if value == "none":
        return None
    path = RunPaths(cfg.run_dir).stage(get_stage(value).subdir).model \
        if value in [d.name for d in TRAINING_STAGES] else Path(value)
    if not (path / "config.json").is_file():
        hint = "train it with `chatforge align reward`" if value == "reward" else "give a reward model's directory"
        raise ConfigError(f"ppo.reward_model: no reward model at {path} ({hint}, or set ppo.reward_model=none "
                          f"with ppo.rewards)")
    return path


def build(ctx: StageContext) -> StageParts:
    """PPO on the parent (by default the run's chat model), scored by the run's reward model."""
    from chatforge.align.compare import held_out_answers
    from chatforge.align.reward import load_reward_model, require_same_tokenizer

    f: PPOConfig = ctx.section
    tok, backbone = ctx.tokenizer, ctx.backbone
    block = backbone.config.block_size
    items, skipped = stage_prompts(ctx, "ppo")
    rm = None
    rm_dir = reward_model_dir(ctx.cfg, f.reward_model)
    if rm_dir is not None:
        if ctx.parent is not None:
            require_same_tokenizer(rm_dir, ctx.parent.path)
        rm, _ = load_reward_model(rm_dir, ctx.device)
        if rm.backbone.config.block_size < block:
            raise ChatforgeError(f"ppo.reward_model: {rm_dir} reads {rm.backbone.config.block_size} tokens, the "
                                 f"policy writes up to {block}")
        for p in rm.parameters():
            p.requires_grad_(False)
        ctx.say(f"ppo: scored by the reward model {rm_dir}")
    functions = CombinedReward(f.rewards, f.reward_weights, ctx.sources["train"], ctx.run.root,
                               ctx.parent.path if ctx.parent else None) if f.rewards else None
    reference = copy.deepcopy(backbone).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    model = PolicyWithValue(backbone).to(ctx.device)
    rollouts = PPORollouts(model, reference, Scorer(rm, functions, tok, ctx.precision), tok, items, f, ctx.precision,
                           ctx.dist, say=ctx.say)

    def test(m: nn.Module, result: TrainResult) -> StageTest:
        metrics: dict[str, Any] = {}
        details: dict[str, Any] = {"reward_model": str(rm_dir) if rm_dir else None, "rewards": f.rewards,
                                   "kl_coef": f.kl_coef, "kl_target": f.kl_target}
        files: dict[str, Any] = {}
        if f.eval_generate:
            gen, more, rows = held_out_answers(ctx, backbone, ctx.sources["test"], f.eval_generate,
                                               f.max_new_tokens, f.frequency_penalty)
            metrics.update(gen)
            details.update(more)
            files["answers.jsonl"] = rows
        log = ctx.out.root / "metrics.jsonl"
        if log.is_file():  # the first and last logged rollout score, KL and final KL coefficient
            train = [x for x in (json.loads(line) for line in log.read_text().split("\n") if line.strip())
                     if "score" in x]
            if train:
                metrics |= {"train_score_first": train[0]["score"], "train_score_last": train[-1]["score"],
                            "train_kl_last": train[-1]["kl"], "kl_coef_last": train[-1]["kl_coef"]}
        primary = "test_check_all" if "test_check_all" in metrics else "final_train_loss"
        return StageTest(metrics=metrics, primary=primary, details=details, files=files)

    mean_prompt = sum(len(it.ids) for it in items) / len(items)
    return StageParts(
        model=model, save=backbone, uses_lm_head=True, batches=rollouts, loss=lambda m, b: ppo_loss(m, b, f),
        tokens_per_micro_batch=max(1, round((mean_prompt + f.max_new_tokens) * f.batch_size)),
        test=test, keep_trainable=("value_head",), units_per_batch=f.batch_size * f.max_new_tokens / 2,
        meta={"ppo": {"reward_model": str(rm_dir) if rm_dir else None, "rewards": f.rewards, "kl_coef": f.kl_coef,
                      "kl_target": f.kl_target}},
        info={"prompts": len(items), "prompts_left_out": skipped},
    )
