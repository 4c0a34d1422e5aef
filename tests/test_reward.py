"""The reward model: Bradley-Terry against hand-computed values, the score at the end-of-turn token, the stage."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import pretrained_run
from torch import nn

from chatforge.align.pairs import by_prompt, sample_groups, tokenize_pairs
from chatforge.align.reward import (
    collate_groups,
    collate_scored,
    load_reward_model,
    pair_rows,
    require_same_tokenizer,
    reward_loss,
    score_answers,
)
from chatforge.config import load_config
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.io import write_jsonl
from chatforge.model import GPT, GPTConfig
from chatforge.model.heads import GPTWithHead, ScalarHead
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.stage import run_stage

TOK = ByteTokenizer()
ROOT = Path(__file__).resolve().parents[1]


class FixedScores(nn.Module):
    """Returns the given scores whatever the input (for the loss alone)."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.scores = nn.Parameter(torch.tensor(scores))

    def forward(self, idx, attention_mask):
        return self.scores


def row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_bradley_terry_loss_equals_hand_computed_values():
    batch = {"idx": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.bool)}
    out = reward_loss(FixedScores([1.0, 2.0, -1.0, 1.0]), batch)  # pairs: (1 vs -1), (2 vs 1)
    want = math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))  # -log sigmoid(2) - log sigmoid(1)
    assert out.count == 2 and out.sum.item() == pytest.approx(want, abs=1e-6)
    assert out.metrics["accuracy"][0].item() == 2 and out.metrics["margin"][0].item() == pytest.approx(3.0)
    centred = reward_loss(FixedScores([1.0, 2.0, -1.0, 1.0]), batch, center=0.5)
    assert centred.sum.item() == pytest.approx(want + 0.5 * (0.0 ** 2 + 3.0 ** 2), abs=1e-6)


def test_the_score_is_read_at_the_end_of_turn_token_never_at_padding():
    torch.manual_seed(0)
    backbone = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=TOK.vocab_size, block_size=64))
    model = GPTWithHead(backbone, ScalarHead(32, reduce="last")).eval()
    nn.init.normal_(model.head.proj.weight)  # a trained head: non-zero scores
    items = [([{"role": "user", "content": "hi"}], "fine"),
             ([{"role": "user", "content": "where is my parcel?"}], "it left our warehouse today")]
    alone = [score_answers(model, TOK, [it])[0] for it in items]
    together = score_answers(model, TOK, items)  # the first is right-padded to the second's length
    assert together == pytest.approx(alone, abs=1e-5)
    from chatforge.chat.template import render

    ids = render([*items[0][0], {"role": "assistant", "content": items[0][1]}], TOK).ids
    assert ids[-1] == TOK.end_id
    with torch.no_grad():
        hidden = backbone.forward_hidden(torch.tensor([ids]))
        at_end = model.head.proj(hidden[0, -1]).item()
        # other padding ids after the answer change nothing
        b = collate_scored([ids, ids + [7] * 5], TOK.pad_id)
        b["idx"][0, len(ids):] = 99
        padded = model(b["idx"], b["attention_mask"])[0].item()
    assert alone[0] == pytest.approx(at_end, abs=1e-5) and padded == pytest.approx(at_end, abs=1e-5)
    long = ([{"role": "user", "content": "x" * 80}], "y")
    assert score_answers(model, TOK, [long]) == [None]  # no end-of-turn token inside the context


def test_reward_stage_learns_the_preference_and_scores_with_the_cli(tmp_path):
    runs, base = pretrained_run(tmp_path)
    rng = random.Random(0)
    sets = {}
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        rows = [row(f"order {i}?", f"Thanks! It ships {rng.choice(['today', 'soon'])}.",
                    f"No. {rng.choice(['Go away', 'Whatever'])}.") for i in range(n)]
        rows.append(row("x" * 120, "a", "b"))  # does not fit: dropped, counted
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
        sets[split] = str(tmp_path / f"{split}.jsonl")
    model_dir = runs / "r" / "pretrain" / "model"
    reward = [f"reward.init_from={json.dumps(str(model_dir))}", "reward.max_steps=40", "reward.batch_size=8",
              "reward.lr=3e-3", "reward.dtype=fp32", "reward.eval_every=0", "reward.checkpoint_every=0",
              "reward.forgetting_batches=2", *(f"reward.{s}_data={json.dumps(p)}" for s, p in sets.items())]
    ev = run_stage(load_config(overrides=[*base, *reward]), "reward", progress=False)
    m = ev["metrics"]
    assert ev["primary"]["name"] == "test_reward_accuracy" and m["test_pairs"] == 24
    assert m["test_reward_accuracy"] >= 0.95 and m["test_margin_mean"] > 0, m
    assert set(ev["details"]["margin_quantiles"]) == {"p10", "p25", "p50", "p75", "p90"}
    saved = runs / "r" / "align" / "reward" / "model"
    model, tok = load_reward_model(saved)
    good, bad = score_answers(model, tok, [([{"role": "user", "content": "order 7?"}], "Thanks! It ships today."),
                                           ([{"role": "user", "content": "order 7?"}], "No. Go away.")])
    assert good > bad
    cli = subprocess.run([sys.executable, "-m", "chatforge", "align", "score", str(saved), "--prompt", "order 7?",
                          "--answer", "Thanks! It ships today."], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["score"] == pytest.approx(good, abs=1e-4)
    with pytest.raises(ChatforgeError, match="not a reward model"):
        load_reward_model(model_dir)


def test_a_policy_with_another_tokenizer_is_refused(tmp_path):
    from chatforge.tokenizer.char import CharTokenizer

    (tmp_path / "rm").mkdir()
    (tmp_path / "policy").mkdir()
    TOK.save(tmp_path / "rm" / "tokenizer")
    TOK.save(tmp_path / "same" / "tokenizer")
    CharTokenizer("abc def").save(tmp_path / "policy" / "tokenizer")
    require_same_tokenizer(tmp_path / "rm", tmp_path / "same")
    with pytest.raises(ChatforgeError, match=r"reward model .*rm and the policy .*policy have different tokenizers"):
        require_same_tokenizer(tmp_path / "rm", tmp_path / "policy")


def test_reward_config_errors_and_pairs_that_cannot_be_scored():
    with pytest.raises(ConfigError, match="reward.center_rewards_coefficient"):
        load_config(overrides=["reward.center_rewards_coefficient=-1"])
    pairs, stats = tokenize_pairs([("t:1", row("a", "b", "b"))], TOK, 64)
    assert pairs == [] and stats.skipped == {"with identical chosen and rejected answers": 1}


def ranking(prompt: str, ranked: list[tuple[str, int]]) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "candidates": [{"text": t, "rank": r, "quality": "x"} for t, r in ranked]}


def test_a_k_way_ranking_gives_all_its_pairs_kept_together_and_each_answer_scored_once():
    rows = [("f.jsonl:1", ranking("where is it?", [("worst", 2), ("best", 0), ("middle", 1), ("tied", 1)])),
            ("f.jsonl:2", row("other?", "yes", "no")), ("f.jsonl:3", row("other?", "yes", "never"))]
    pairs, stats = tokenize_pairs(rows, TOK, 200)
    # best > middle, tied, worst; middle > worst; tied > worst; the tie makes no pair
    assert stats.rows == 3 and stats.pairs == 5 + 2 and len(pairs) == 7
    assert [p.where for p in pairs[:2]] == ["f.jsonl:1 (rank 0 > 1)"] * 2
    groups = by_prompt(pairs)
    assert [len(g) for g in groups] == [5, 2]  # the two rows sharing a prompt are kept together too
    batch = collate_groups(groups, TOK.pad_id)
    assert batch["idx"].shape[0] == 4 + 3  # each answer once: 4 ranked, then yes/no/never
    grouped = reward_loss(FixedScores([float(i) for i in range(7)]), batch)
    # the same pairs laid out one row per answer of each pair give the same loss
    flat = pair_rows(pairs, TOK.pad_id)
    score_of = {tuple(batch["idx"][i][batch["attention_mask"][i]].tolist()): float(i) for i in range(7)}
    flat_scores = [score_of[tuple(flat["idx"][i][flat["attention_mask"][i]].tolist())] for i in range(14)]
    assert grouped.count == 7 and grouped.sum.item() == pytest.approx(
        reward_loss(FixedScores(flat_scores), flat).sum.item(), abs=1e-6)
    assert sample_groups(groups, 2, seed=0) in ([groups[0]], [groups[1]])  # whole prompts, never split
    assert sample_groups(groups, 0, seed=0) == groups
    with pytest.raises(DataError, match=r"f.jsonl:9: candidates\[1\] must be an object with 'text'"):
        tokenize_pairs([("f.jsonl:9", {"prompt": "p", "candidates": [{"text": "a", "rank": 0}, {"text": "b"}]})],
                       TOK, 200)
    with pytest.raises(DataError, match="at least 2 answers"):
        tokenize_pairs([("f.jsonl:9", {"prompt": "p", "candidates": [{"text": "a", "rank": 0}]})], TOK, 200)
