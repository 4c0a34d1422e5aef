"""DPO: the losses against hand-computed values, reference log-probabilities, pair data, one step, the stage."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import pretrained_run

from chatforge.align.dpo import (
    answer_logps,
    collate_pairs,
    dpo_loss,
    dpo_step_loss,
    pair_batch,
    score_pairs,
)
from chatforge.align.pairs import load_pairs, tokenize_pairs
from chatforge.config import DPOConfig, load_config
from chatforge.device import resolve_precision
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.io import write_jsonl
from chatforge.model import GPT, GPTConfig
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import load_model
from chatforge.train.stage import run_stage

TOK = ByteTokenizer()
FP32 = resolve_precision("fp32", torch.device("cpu"))


def tiny_model(seed: int = 0, block: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=TOK.vocab_size, block_size=block))


def row(prompt: str, chosen: str, rejected: str, conversational: bool = True) -> dict:
    if not conversational:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


# --------------------------------------------------------------------------- the losses


def test_losses_equal_hand_computed_values():
    # h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2; beta = 0.5, so beta*h = 1
    args = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0)]
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(-x)
    expected = {
        ("sigmoid", 0.0): softplus(-1),  # -log sigmoid(1) = 0.31326
        ("sigmoid", 0.1): 0.9 * softplus(-1) + 0.1 * softplus(1),  # cDPO
        ("robust", 0.1): (0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8,
        ("hinge", 0.0): 0.0,  # max(0, 1 - 1)
        ("ipo", 0.0): (2 - 1 / (2 * 0.5)) ** 2,  # (h - 1/(2 beta))^2 = 1
    }
    for (kind, eps), want in expected.items():
        losses, chosen, rejected = dpo_loss(*args, beta=0.5, loss_type=kind, label_smoothing=eps)
        assert losses.item() == pytest.approx(want, abs=1e-6), kind
        assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert softplus(-1) == pytest.approx(0.313262, abs=1e-6)
    with pytest.raises(Exception, match="loss_type"):
        dpo_loss(*args, beta=0.5, loss_type="kto")


def test_policy_equal_to_reference_gives_log_2_and_zero_margins():
    model = tiny_model()
    pairs, _ = tokenize_pairs([("t:1", row("where is it?", "shipped today", "no idea")),
                               ("t:2", row("refund?", "in 5 days", "never"))], TOK, 65)
    scored = score_pairs(model, pairs, TOK.pad_id, 4, False, FP32)
    out = dpo_step_loss(model.eval(), pair_batch(scored, TOK.pad_id), DPOConfig(beta=0.1))
    assert out.count == 2 and (out.sum / out.count).item() == pytest.approx(math.log(2), abs=1e-5)
    assert abs(out.metrics["rewards/margins"][0].item()) < 1e-5 and out.metrics["rewards/accuracies"][0] == 0
    # RPO adds alpha x the chosen answer's NLL per token
    rpo = dpo_step_loss(model, pair_batch(scored, TOK.pad_id), DPOConfig(beta=0.1, rpo_alpha=0.5))
    nll = [-s.ref_chosen / (len(s.pair.chosen) - s.pair.start) for s in scored]
    assert rpo.sum.item() == pytest.approx(2 * math.log(2) + 0.5 * sum(nll), abs=1e-4)
    assert rpo.metrics["nll_loss"][0].item() == pytest.approx(sum(nll), abs=1e-4)


def test_answer_logprobs_are_the_answer_tokens_only_and_padding_changes_nothing():
    model = tiny_model(seed=1).eval()
    short = ("t:1", row("hi", "ok", "no"))
    long = ("t:2", row("tell me everything about my order please", "it shipped on monday with a tracking number",
                       "x"))
    pairs, _ = tokenize_pairs([short, long], TOK, 65)
    p = pairs[0]
    with torch.no_grad():
        logits = model(torch.tensor([p.chosen]))[0][0]
        lp = torch.log_softmax(logits, -1)
        want = sum(lp[t - 1, p.chosen[t]].item() for t in range(p.start, len(p.chosen)))
        alone, counts = answer_logps(model, collate_pairs([p], TOK.pad_id))
        batched, _ = answer_logps(model, collate_pairs(pairs, TOK.pad_id))  # padded to the long pair
    assert counts[0].item() == len(p.chosen) - p.start == len("ok") + 1  # the content and <|end|>
    assert alone[0].item() == pytest.approx(want, abs=1e-4) and batched[0].item() == pytest.approx(want, abs=1e-4)
    assert batched[2].item() == pytest.approx(alone[1].item(), abs=1e-4)  # rejected rows follow the chosen ones


def test_dpo_steps_move_probability_toward_the_chosen_answer():
    model = tiny_model(seed=2)
    pairs, _ = tokenize_pairs([("t:1", row("status?", "it was delivered", "it is lost"))], TOK, 65)
    scored = score_pairs(model, pairs, TOK.pad_id, 2, False, FP32)
    batch = pair_batch(scored, TOK.pad_id)
    f = DPOConfig(beta=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    first = dpo_step_loss(model, batch, f)
    for _ in range(5):
        opt.zero_grad()
        out = dpo_step_loss(model, batch, f)
        out.sum.backward()
        opt.step()
    with torch.no_grad():
        logps, _ = answer_logps(model.eval(), batch)
    gap_before = scored[0].ref_chosen - scored[0].ref_rejected
    assert logps[0] - logps[1] > gap_before + 0.5  # chosen gained on rejected
    last = dpo_step_loss(model, batch, f)
    assert last.sum.item() < first.sum.item() and last.metrics["rewards/accuracies"][0] == 1


# --------------------------------------------------------------------------- pair data


def test_pairs_in_both_forms_with_counted_skips(tmp_path):
    rows = [row("a?", "yes", "no"), row("a?", "yes", "no", conversational=False), row("c?", "same", "same"),
            row("d?", "  ", "no"), row("x" * 200, "yes", "no"), row("e?", "y" * 100, "n" * 100)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, stats = load_pairs(tmp_path / "p.jsonl", TOK, 65)
    assert [p.where for p in pairs] == [f"{tmp_path / 'p.jsonl'}:{i}" for i in (1, 2, 6)]
    assert pairs[0].chosen == pairs[1].chosen  # the plain form is one user turn and one assistant turn
    assert stats.truncated == 1 and len(pairs[2].chosen) == 65
    assert stats.skipped == {"with identical chosen and rejected answers": 1, "with an empty answer": 1,
                             "whose prompt leaves no room in the context": 1}
    assert "3 pairs from 6 rows" in stats.summary()


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "a", "chosen": "b"}, r"p.jsonl:1: missing field 'rejected'"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, "all be strings"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"},
                                                               {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "assistant", "content": "d"}]}, "field 'chosen' must hold exactly one assistant"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "d"}]},
     "ends with an assistant message"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "field 'prompt' must be a string or a list"),
])
def test_bad_pair_rows_name_the_line_and_field(tmp_path, bad, message):
    write_jsonl(tmp_path / "p.jsonl", [bad])
    with pytest.raises(DataError, match=message):
        load_pairs(tmp_path / "p.jsonl", TOK, 65)


# --------------------------------------------------------------------------- the stage


def test_align_dpo_stage_learns_the_preference_and_keeps_the_sft_model(tmp_path):
    runs, base = pretrained_run(tmp_path)
    rng = random.Random(0)
    sets = {}
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        rows = []
        for _ in range(n):
            status = rng.choice(["shipped", "delivered", "lost"])
            rows.append(row(f"status {status}?", f"Your order is {status}.", f"Your order is {rng.choice(['gone', 'late'])}."))
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
        sets[split] = str(tmp_path / f"{split}.jsonl")
    # the parent is a model directory (here the pre-trained model) and the reference
    dpo = [f"dpo.init_from={json.dumps(str(runs / 'r' / 'pretrain' / 'model'))}", "dpo.max_steps=30",
           "dpo.batch_size=8", "dpo.lr=3e-3", "dpo.dtype=fp32", "dpo.eval_every=0", "dpo.checkpoint_every=0",
           "dpo.forgetting_batches=2", "dpo.eval_generate=0", "dpo.beta=0.5",
           *(f"dpo.{s}_data={json.dumps(p)}" for s, p in sets.items())]
    ev = run_stage(load_config(overrides=[*base, *dpo]), "dpo", progress=False)
    m = ev["metrics"]
    assert ev["primary"]["name"] == "test_reward_accuracy" and m["test_pairs"] == 16
    assert m["test_reward_accuracy"] >= 0.9 and m["test_reward_margin"] > 0.5, m
    assert m["test_reward_chosen"] > m["test_reward_rejected"]
    assert ev["parent"]["stage"] == "pretrain" and ev["train"]["train_pairs"] == 64
    model, tok, meta = load_model(runs / "r" / "align" / "dpo" / "model")
    assert meta["task"] == "chat" and meta["dpo"] == {"beta": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0,
                                                      "rpo_alpha": 1.0}  # the tiny preset's RPO term
    metrics = [json.loads(x) for x in (runs / "r" / "align" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in x for x in metrics)


def test_dpo_config_errors():
    with pytest.raises(ConfigError, match="dpo.beta: must be > 0"):
        load_config(overrides=["dpo.beta=0"])
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        load_config(overrides=["dpo.loss_type=kto"])
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        load_config(overrides=["dpo.label_smoothing=0.5"])


def test_kl_from_the_parent_is_zero_for_identical_models_and_positive_otherwise():
    import copy

    from chatforge.align.compare import _answer_ids, kl_per_token

    model = tiny_model(seed=4).eval()
    seqs = [_answer_ids([{"role": "user", "content": "hi"}], "hello there", TOK)]
    assert abs(kl_per_token(model, copy.deepcopy(model), seqs, FP32)) < 1e-6
    other = tiny_model(seed=5).eval()
    torch.nn.init.normal_(other.lm_head.weight)  # a fresh head is zero (uniform): make this one differ
    assert kl_per_token(model, other, seqs, FP32) > 1e-3


def test_pairs_sampled_from_the_model_and_judged_by_a_reward_are_dpo_data(tmp_path):
    from chatforge.align.rewards import CombinedReward
    from chatforge.align.sampled import sample_pairs_from_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=TOK.vocab_size, block_size=64))
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(6)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    src = str(tmp_path / "c.jsonl")
    out = tmp_path / "pairs.jsonl"
    stats = sample_pairs_from_model(model, TOK, src, CombinedReward(["grpo_rewards:ascii_first"], [], src), out,
                                    samples=6, max_new_tokens=4, say=lambda s: None)
    assert stats.prompts == 6 and stats.pairs + stats.flat + stats.unscored == 6 and stats.pairs >= 3
    written = [json.loads(x) for x in out.read_text().splitlines()]
    for r in written:  # the chosen answer starts with an ASCII character, the rejected one does not
        assert ord(r["chosen"][0]["content"][0]) < 128 <= ord(r["rejected"][0]["content"][0])
        assert r["meta"]["chosen_score"] == 1.0 and r["meta"]["rejected_score"] == 0.0
    pairs, _ = load_pairs(out, TOK, 65)
    assert len(pairs) == stats.pairs  # DPO and the reward model read them as they are
    with pytest.raises(ChatforgeError, match=r"no pairs: .* closer than the minimum gap"):  # 0/1 scores: gap 1
        sample_pairs_from_model(model, TOK, src, CombinedReward(["grpo_rewards:ascii_first"], [], src),
                                tmp_path / "gap.jsonl", samples=6, max_new_tokens=4, min_gap=1.5, say=lambda s: None)
    with pytest.raises(ChatforgeError, match=r"no pairs: 6 prompts' answers all scored the same"):
        sample_pairs_from_model(model, TOK, src, CombinedReward(["grpo_rewards:constant"], [], src),
                                tmp_path / "none.jsonl", samples=3, max_new_tokens=4, say=lambda s: None)
    assert not (tmp_path / "none.jsonl").exists()
