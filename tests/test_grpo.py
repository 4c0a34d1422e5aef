"""GRPO: group advantages, the warnings for signal-free steps, masking, a step that learns, resume, the stage."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import byte_prompt_items, pretrained_run, tiny_byte_gpt

from chatforge.align.grpo import Rollouts, group_advantages, grpo_loss
from chatforge.align.rewards import CombinedReward
from chatforge.config import GRPOConfig, load_config
from chatforge.device import resolve_precision
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.io import write_jsonl
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.dist import DistInfo
from chatforge.train.stage import run_stage

TOK = ByteTokenizer()
FP32 = resolve_precision("fp32", torch.device("cpu"))


tiny_model = tiny_byte_gpt
items = byte_prompt_items


def rollouts(model, reward: str, said: list, **kw) -> Rollouts:
    f = GRPOConfig(**{"batch_size": 2, "group_size": 4, "max_new_tokens": 6, "rewards": [reward], **kw})
    return Rollouts(model, TOK, items(), f, CombinedReward(f.rewards, [], ""), FP32, DistInfo(), say=said.append)


def test_group_advantages_by_hand():
    adv, valid, flat = group_advantages([1.0, 0.0, None, 0.5], 2, "group")
    std = 0.5 ** 0.5  # sample std of (1, 0)
    assert adv[:2] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)]) and adv[2:] == [0.0, 0.0]
    assert valid == [True, True, False, True] and flat == 1  # the second group has one scored answer
    assert group_advantages([1.0, 0.0], 2, "none")[0] == [0.5, -0.5]  # Dr. GRPO: no std division
    assert group_advantages([0.3, 0.3, 0.3, 0.3], 2, "group")[2] == 2


def test_flat_and_truncated_steps_warn_and_unscorable_answers_are_masked():
    said: list[str] = []
    batch = next(rollouts(tiny_model(), "grpo_rewards:constant", said, max_new_tokens=3))
    assert any("every group's answers got the same reward" in s for s in said)
    assert any("were cut at max_new_tokens=3" in s for s in said)
    assert batch["flat_groups"] == batch["groups"] == 2 and bool((batch["advantages"] == 0).all())
    said.clear()
    batch = next(rollouts(tiny_model(), "grpo_rewards:only_even", said))
    masked = [i for i in range(batch["answers"]) if not bool((batch["targets"][i] != -1).any())]
    assert batch["scored"] == batch["answers"] - len(masked)  # None: left out, never scored 0
    out = grpo_loss(tiny_model(), batch, GRPOConfig(), FP32)
    assert out.count == int((batch["targets"] != -1).sum())


def test_a_reward_that_raises_names_itself_and_bad_names_are_config_errors():
    with pytest.raises(ChatforgeError, match=r"reward function 'grpo_rewards:broken' raised on t:\d: ValueError"):
        next(rollouts(tiny_model(), "grpo_rewards:broken", []))
    with pytest.raises(ConfigError, match=r"neither .checks., .reward_model\[:DIR\]. nor"):
        CombinedReward(["nonsense"], [], "")
    with pytest.raises(ConfigError, match="cannot load"):
        CombinedReward(["grpo_rewards:missing"], [], "")
    with pytest.raises(ConfigError, match="2 weights for 1"):
        CombinedReward(["grpo_rewards:constant"], [1.0, 2.0], "")


def test_grpo_steps_raise_the_reward():
    model = tiny_model(seed=3)
    # reward 1 when the answer starts with an ASCII character: about half of the byte vocabulary
    r = rollouts(model, "grpo_rewards:ascii_first", [], group_size=8, max_new_tokens=2, temperature=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def p_ascii() -> float:
        with torch.no_grad():
            logits = model(torch.tensor([items()[0].ids]))[0][0, -1]
        return float(torch.softmax(logits, -1)[:128].sum())

    before = p_ascii()
    rewards = []
    for _ in range(20):
        batch = next(r)
        rewards.append(batch["reward_sum"] / batch["scored"])
        out = grpo_loss(model.train(), batch, r.f, FP32)
        opt.zero_grad()
        (out.sum / out.count).backward()
        opt.step()
    assert p_ascii() > before + 0.15, (before, p_ascii())
    assert sum(rewards[-5:]) > sum(rewards[:5])


def test_rollouts_resume_to_the_same_next_batch():
    model = tiny_model()
    r = rollouts(model, "grpo_rewards:starts_with_a", [])
    next(r)
    state = json.loads(json.dumps(r.state_dict()))
    want = next(r)
    again = rollouts(model, "grpo_rewards:starts_with_a", [])
    again.load_state_dict(state)
    got = next(again)
    assert torch.equal(got["idx"], want["idx"]) and torch.equal(got["advantages"], want["advantages"])


def test_grpo_stage_runs_on_conversations_and_is_not_in_the_pipeline(tmp_path):
    from chatforge.pipeline import model_stages

    assert "grpo" not in [s.name for s in model_stages()] and "dpo" in [s.name for s in model_stages()]
    runs, base = pretrained_run(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(12)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    src = json.dumps(str(tmp_path / "c.jsonl"))
    grpo = [f"grpo.init_from={json.dumps(str(runs / 'r' / 'pretrain' / 'model'))}", "grpo.max_steps=3",
            "grpo.batch_size=2", "grpo.group_size=4", "grpo.max_new_tokens=8", "grpo.dtype=fp32",
            "grpo.checkpoint_every=0", "grpo.forgetting_batches=2", "grpo.eval_generate=0",
            'grpo.rewards=["grpo_rewards:starts_with_a"]', f"grpo.train_data={src}", f"grpo.val_data={src}",
            f"grpo.test_data={src}"]
    ev = run_stage(load_config(overrides=[*base, *grpo]), "grpo", progress=False)
    assert ev["train"]["steps"] == 3 and ev["train"]["prompts"] == 12
    assert 0 <= ev["metrics"]["train_reward_last"] <= 1 and ev["parent"]["stage"] == "pretrain"
    logged = [json.loads(x) for x in (runs / "r" / "align" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "clip_frac", "flat_groups", "truncated", "answer_len"} <= set(logged[0])
