"""PPO: GAE and clipping by hand, the KL controller, rewards at the end-of-turn token, a step that learns,
resume after SIGKILL, the stage (saved as a plain chat model) and its bad inputs."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import byte_prompt_items, pretrained_run, tiny_byte_gpt

from chatforge.align.ppo import (
    AdaptiveKL,
    PolicyWithValue,
    PPORollouts,
    RunningMoments,
    Scorer,
    gae,
    masked_whiten,
    ppo_loss,
    ppo_losses,
)
from chatforge.align.rewards import CombinedReward
from chatforge.chat.template import stop_token_ids
from chatforge.config import PPOConfig, load_config
from chatforge.device import resolve_precision
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.io import write_jsonl
from chatforge.model import GPT, GPTConfig
from chatforge.model.generate import Generation
from chatforge.model.heads import GPTWithHead, ScalarHead
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import latest_checkpoint, load_model, save_model
from chatforge.train.dist import DistInfo
from chatforge.train.metrics_log import read_metrics
from chatforge.train.stage import run_stage

TOK = ByteTokenizer()
FP32 = resolve_precision("fp32", torch.device("cpu"))
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


tiny_gpt = tiny_byte_gpt
items = byte_prompt_items


def rollouts(policy: PolicyWithValue, reward: str, said: list | None = None, reward_model=None, **kw) -> PPORollouts:
    f = PPOConfig(**{"batch_size": 4, "rollout_batches": 2, "ppo_epochs": 2, "max_new_tokens": 6,
                     "reward_model": "none", "rewards": [reward] if reward else [], **kw})
    fns = CombinedReward(f.rewards, [], "") if f.rewards else None
    reference = copy.deepcopy(policy.backbone).eval()
    return PPORollouts(policy, reference, Scorer(reward_model, fns, TOK, FP32), TOK, items(8), f, FP32, DistInfo(),
                       say=(said if said is not None else []).append)


def test_gae_by_hand():
    # one answer of 3 tokens, score 1 on the last; gamma 1, lambda 0.5
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.1]]), torch.tensor([[1, 1, 1]]),
                   gamma=1.0, lam=0.5)
    # t=2: 1 - 0.1 = 0.9; t=1: (0 + 0.1 - 0.2) + 0.5 * 0.9 = 0.35; t=0: (0 + 0.2 - 0.5) + 0.5 * 0.35 = -0.125
    assert adv.tolist()[0] == pytest.approx([-0.125, 0.35, 0.9])
    assert ret.tolist()[0] == pytest.approx([0.375, 0.55, 1.0])
    # positions off the answer (prompt before, padding after) neither count nor leak their values in
    adv, ret = gae(torch.tensor([[5.0, 0.0, 1.0, 7.0]]), torch.tensor([[9.0, 0.2, 0.1, 9.0]]),
                   torch.tensor([[0, 1, 1, 0]]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.0, 0.35, 0.9, 0.0]) and ret[0, 0] == 0 and ret[0, 3] == 0
    # gamma < 1 discounts the next value: t=0 of a 2-token answer with values 0 and score 1 at the end
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.9, 1.0])


def test_ppo_clipping_on_a_constructed_case():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    values = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    out = ppo_losses(logp, old, adv, values, torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), mask,
                     cliprange=0.2, cliprange_value=0.2)
    # ratio 1.5, A=1: clipped at 1.2; ratio 0.5, A=-1: clipped at 0.8; ratio 0.5, A=1: the unclipped,
    # lower objective (pessimistic bound) 0.5; ratio 1.1 is inside the range
    assert out["policy"].tolist()[0] == pytest.approx([-1.2, 0.8, -0.5, -1.1])
    assert out["clipped"].tolist()[0] == [1.0, 1.0, 1.0, 0.0]
    out["policy"].sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, -0.5, -1.1])  # clipped terms pass no gradient
    # value 1 vs return 1 from an old value of 0: the clipped value 0.2 is farther, so it counts
    assert out["value"][0, 0].item() == pytest.approx(0.5 * 0.8 ** 2)
    assert out["value_clipped"][0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_adaptive_kl_and_running_moments():
    kl = AdaptiveKL(0.1, target=1.0, horizon=100)
    kl.update(3.0, 10)  # far above the target: the error is clipped to +0.2
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    kl.update(0.9, 10)
    assert kl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = AdaptiveKL(0.1, target=0.0, horizon=100)
    fixed.update(50.0, 10)
    assert fixed.value == 0.1
    m = RunningMoments()
    xs = [0.3, 1.0, -2.0, 4.0, 0.5, 0.5, 7.0]
    m.update(xs[:3])
    m.update(xs[3:])
    t = torch.tensor(xs, dtype=torch.float64)
    assert m.mean == pytest.approx(float(t.mean())) and m.std == pytest.approx(float(t.std(unbiased=False)))
    w = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]]))
    assert w.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_kl_is_zero_for_identical_models_and_the_first_ratio_is_one():
    policy = PolicyWithValue(tiny_gpt())
    r = rollouts(policy, "grpo_rewards:ascii_first")
    batch = next(r)
    assert r.buffer["stats"]["kl"] == 0.0
    out = ppo_loss(policy, batch, r.f)
    assert out.metrics["approx_kl"][0].item() == 0.0 and out.metrics["clip_frac"][0].item() == 0.0
    # the value head starts at zero: every value of the rollout is 0
    assert float(r.buffer["old_values"].abs().max()) == 0.0


def test_the_reward_model_score_is_read_at_each_answers_end_of_turn_token():
    torch.manual_seed(1)
    rm = GPTWithHead(tiny_gpt(seed=2), ScalarHead(32, reduce="last")).eval()
    torch.nn.init.normal_(rm.head.proj.weight)
    stop = sorted(stop_token_ids(TOK))[0]
    its = items(2)
    gens = [Generation(tokens=[65, 66, stop], finish_reason="stop", logprobs=[0.0] * 3),
            Generation(tokens=[67] * 9 + [stop], finish_reason="stop", logprobs=[0.0] * 10)]
    together = Scorer(rm, None, TOK, FP32)(its, gens)
    for it, g, score in zip(its, gens, together):
        with torch.no_grad():
            alone = rm(torch.tensor([it.ids + g.tokens]))
        assert score == pytest.approx(float(alone), abs=1e-5)  # the short answer's padding is never read
    # reward functions add to the score; None masks the answer
    both = Scorer(rm, CombinedReward(["grpo_rewards:constant"], [], ""), TOK, FP32)(its, gens)
    assert both == pytest.approx([s + 0.5 for s in together])
    masked = Scorer(rm, CombinedReward(["grpo_rewards:only_even"], [], ""), TOK, FP32)(its, gens)
    assert masked[0] == pytest.approx(together[0] + 1.0) and masked[1] is None  # "AB" is even, 9 C's are not
    with pytest.raises(ConfigError, match="nothing scores"):
        Scorer(None, None, TOK, FP32)


def test_truncated_rollouts_warn_and_are_penalised():
    said: list[str] = []
    r = rollouts(PolicyWithValue(tiny_gpt()), "grpo_rewards:constant", said, max_new_tokens=2,
                 normalize_rewards=False, missing_eos_penalty=1.0)
    next(r)
    assert any("answers were cut at max_new_tokens=2" in s for s in said)
    stats = r.buffer["stats"]
    assert stats["truncated"] == 1.0 and stats["score"] == pytest.approx(0.5 - 1.0)


def test_ppo_steps_move_probability_toward_the_rewarded_answers():
    policy = PolicyWithValue(tiny_gpt(seed=3))
    r = rollouts(policy, "grpo_rewards:ascii_first", max_new_tokens=2, kl_coef=0.0, batch_size=8,
                 missing_eos_penalty=0.0)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)

    def p_ascii() -> float:
        with torch.no_grad():
            logits = policy.backbone(torch.tensor([items()[0].ids]))[0][0, -1]
        return float(torch.softmax(logits, -1)[:128].sum())

    before = p_ascii()
    for _ in range(40):  # 10 rollouts of 16 answers
        out = ppo_loss(policy.train(), next(r), r.f)
        opt.zero_grad()
        (out.sum / out.count).backward()
        opt.step()
    assert p_ascii() > before + 0.15, (before, p_ascii())


def test_rollouts_resume_mid_rollout_to_the_same_next_batch(tmp_path):
    policy = PolicyWithValue(tiny_gpt())
    r = rollouts(policy, "grpo_rewards:ascii_first")
    for _ in range(3):  # into the second pass over the first rollout
        next(r)
    torch.save(r.state_dict(), tmp_path / "state.pt")
    want = [next(r) for _ in range(3)]  # the rest of this rollout, then the next one's first mini-batch
    again = rollouts(policy, "grpo_rewards:ascii_first")
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    got = [next(again) for _ in range(3)]
    for a, b in zip(got, want):
        assert torch.equal(a["idx"], b["idx"]) and torch.equal(a["advantages"], b["advantages"])


# --------------------------------------------------------------------------- the stage


def _conversations(tmp_path: Path) -> str:
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(12)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    return json.dumps(str(tmp_path / "c.jsonl"))


def _ppo_overrides(runs: Path, src: str, *more: str) -> list[str]:
    return [f"ppo.init_from={json.dumps(str(runs / 'r' / 'pretrain' / 'model'))}", "ppo.batch_size=4",
            "ppo.rollout_batches=2", "ppo.ppo_epochs=2", "ppo.max_new_tokens=8", "ppo.dtype=fp32",
            "ppo.checkpoint_every=0", "ppo.forgetting_batches=2", "ppo.eval_generate=0", f"ppo.train_data={src}",
            f"ppo.val_data={src}", f"ppo.test_data={src}", *more]


def test_ppo_stage_scores_with_a_reward_model_and_saves_a_chat_model(tmp_path):
    from chatforge.pipeline import model_stages

    assert "ppo" not in [s.name for s in model_stages()]
    runs, base = pretrained_run(tmp_path)
    pre = runs / "r" / "pretrain" / "model"
    backbone, tok, _ = load_model(pre)
    torch.manual_seed(0)
    rm = GPTWithHead(backbone, ScalarHead(backbone.config.n_embd, reduce="last"))
    torch.nn.init.normal_(rm.head.proj.weight, std=0.1)
    save_model(tmp_path / "rm", rm, tok, {"stage": "reward", "task": "reward"})
    src = _conversations(tmp_path)
    cfg = load_config(overrides=[*base, *_ppo_overrides(runs, src, "ppo.max_steps=4", "ppo.replay=0.2",
                                                          f"ppo.reward_model={json.dumps(str(tmp_path / 'rm'))}")])
    ev = run_stage(cfg, "ppo", progress=False)  # with pre-training replay: PPO-ptx
    assert ev["train"]["steps"] == 4 and ev["parent"]["stage"] == "pretrain" and ev["task"] == "chat"
    logged = read_metrics(runs / "r" / "align" / "ppo" / "metrics.jsonl", "train")
    assert {"score", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "policy_loss", "answer_len",
            "truncated", "replay_loss"} <= set(logged[0])
    saved = runs / "r" / "align" / "ppo" / "model"
    model, _, config = load_model(saved)  # a plain GPT: the value head is not saved with it
    assert config["task"] == "chat" and isinstance(model, GPT)
    assert not any("value_head" in k for k in model.state_dict())
    # the default reward model is the run's, which this run has not trained
    with pytest.raises(ConfigError, match="align reward"):
        run_stage(load_config(overrides=[*base, *_ppo_overrides(runs, src, "ppo.max_steps=1")]), "ppo", progress=False)


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path):
    from chatforge.tokenizer.char import CharTokenizer

    runs, base = pretrained_run(tmp_path)
    other = CharTokenizer("abc def")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=other.vocab_size, block_size=96))
    save_model(tmp_path / "rm", GPTWithHead(gpt, ScalarHead(32)), other, {"stage": "reward", "task": "reward"})
    src = _conversations(tmp_path)
    cfg = load_config(overrides=[*base, *_ppo_overrides(runs, src, "ppo.max_steps=1",
                                                          f"ppo.reward_model={json.dumps(str(tmp_path / 'rm'))}")])
    with pytest.raises(ChatforgeError, match="different tokenizers"):
        run_stage(cfg, "ppo", progress=False)


def _cli(runs: Path, base: list[str], src: str, *extra: str) -> list[str]:
    over = [*base, *_ppo_overrides(runs, src, "ppo.max_steps=24", "ppo.checkpoint_every=6", "ppo.keep_last=5",
                                   "ppo.reward_model=none", 'ppo.rewards=["grpo_rewards:slow_ascii_first"]')]
    return [sys.executable, "-m", "chatforge", "align", "ppo", *[a for o in over for a in ("--set", o)], *extra]


def test_resume_after_sigkill_mid_ppo_continues_the_same_curve(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    curves = {}
    for name in ("full", "killed"):
        runs, base = pretrained_run(tmp_path / name)
        src = _conversations(tmp_path / name)
        if name == "full":
            done = subprocess.run(_cli(runs, base, src), env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            metrics = runs / "r" / "align" / "ppo" / "metrics.jsonl"
            proc = subprocess.Popen(_cli(runs, base, src), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            while time.time() < deadline:  # past the checkpoint at step 6 (mid-rollout: 4 steps per rollout)
                if metrics.exists() and any(r.get("step", 0) >= 8 for r in read_metrics(metrics, "train")):
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            ckpt = latest_checkpoint(runs / "r" / "align" / "ppo" / "ckpt")
            assert ckpt is not None and 6 <= int(ckpt.name.split("_")[1]) < 24
            again = subprocess.run(_cli(runs, base, src, "--resume"), env=env, capture_output=True, text=True)
            assert again.returncode == 0, again.stderr[-3000:]
        rows = read_metrics(runs / "r" / "align" / "ppo" / "metrics.jsonl", "train")
        curves[name] = [(r["step"], r["loss"], r["score"], r["kl_coef"]) for r in rows]
    assert [s for s, *_ in curves["full"]] == list(range(1, 25))
    assert curves["killed"] == curves["full"]  # bit for bit, the rollout in progress included
    assert not math.isnan(curves["full"][-1][1])


def test_a_reward_model_serves_as_a_reward_function(tmp_path):
    from chatforge.align.reward import score_answers

    torch.manual_seed(0)
    rm = GPTWithHead(tiny_gpt(seed=4), ScalarHead(32, reduce="last"))
    torch.nn.init.normal_(rm.head.proj.weight)
    save_model(tmp_path / "rm", rm, TOK, {"stage": "reward", "task": "reward"})
    prompt = [{"role": "user", "content": "q"}]
    fn = CombinedReward([f"reward_model:{tmp_path / 'rm'}"], [], "")
    with torch.no_grad():
        want = score_answers(rm.eval(), TOK, [(prompt, "an answer")])[0]
    assert fn(prompt, "an answer", True, {}) == pytest.approx(want, abs=1e-5)
    # the run's reward model by default; a run without one is a clear error
    with pytest.raises(ConfigError, match="no reward model at .*align/reward/model"):
        CombinedReward(["reward_model"], [], "", run_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs a run"):
        CombinedReward(["reward_model"], [], "")
