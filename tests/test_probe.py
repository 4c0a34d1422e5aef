"""The copy (induction) and record-lookup probes: what they measure, on models whose answer is known."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from chatforge.cli import main
from chatforge.eval.probe import copy_probe, lookup_probe, probe
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import save_model


class Copier(nn.Module):
    """An ideal induction head: at each position, puts its weight on the tokens that followed earlier
    occurrences of the current token (uniform where the token has not occurred yet)."""

    def __init__(self, vocab_size: int, block_size: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size, vocab_size=vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the probe a device

    def forward_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def logits_from_hidden(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(1, T):
                for s in (x[b, :t] == x[b, t]).nonzero().flatten().tolist():
                    logits[b, t, int(x[b, s + 1])] += 8.0
        return logits


class Uniform(Copier):
    def logits_from_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, self.config.vocab_size)


def test_an_induction_head_predicts_the_repeat_and_nothing_else():
    tok = ByteTokenizer()
    r = copy_probe(Copier(tok.vocab_size, 256), tok, n=16, length=48)
    # the first copy is random: no better than uniform (repeats within a copy help a little)
    assert r["first_nll"] > 0.9 * math.log(tok.vocab_size)
    assert r["repeat_nll"] < 0.2 * r["first_nll"] and r["repeat_ratio"] < 0.2 and r["length"] == 48


def test_a_model_that_reads_nothing_scores_uniform_on_both_probes():
    tok = ByteTokenizer()
    model = Uniform(tok.vocab_size, 256)
    c = copy_probe(model, tok, n=8, length=32)
    assert c["first_nll"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    assert c["repeat_ratio"] == pytest.approx(1.0, rel=1e-5)
    lk = lookup_probe(model, tok, n=8)
    assert lk["lookup_nll"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    assert lk["lookup_control_nll"] == pytest.approx(lk["lookup_nll"], rel=1e-5)


def test_probes_are_seeded_and_fit_the_context():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, block_size=64, n_embd=32, n_head=2))
    nn.init.normal_(model.lm_head.weight, std=0.3)  # a fresh LM head is zero: every sequence would score alike
    a, b = probe(model, tok, seed=3, n=8), probe(model, tok, seed=3, n=8)
    assert a == b and probe(model, tok, seed=4, n=8) != a
    assert a["probe_length"] == 31  # (64 - 1) // 2 tokens per copy
    assert "probe_lookup_nll" not in a  # three order lines do not fit 64 bytes: not measured
    assert 0.9 < a["probe_repeat_ratio"] < 1.1  # an untrained model does not copy
    model.train()
    probe(model, tok, n=2)
    assert model.training  # the probe leaves the model's mode as it was


def test_cli_probe(tmp_path, capsys):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    save_model(tmp_path / "m", GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, block_size=256, n_embd=32,
                                                        n_head=2)), tok, {"stage": "pretrain", "task": "lm"})
    assert main(["eval", "probe", str(tmp_path / "m"), "--n", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"first_nll", "repeat_nll", "repeat_ratio", "lookup_nll", "lookup_control_nll", "lookup_top1"} <= set(r)
    assert main(["eval", "probe", str(tmp_path / "m"), "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "copy probe" in out and "record lookup" in out


def test_pretraining_reports_the_probes(tmp_path):
    from helpers import make_run

    from chatforge.config import load_config
    from chatforge.stages import get_stage
    from chatforge.train.pretrain import pretrain

    make_run(tmp_path, "r", n_docs=60)
    cfg = load_config(overrides=["model.depth=1", "model.n_embd=32", "model.n_head=2", "model.block_size=160",
                                 "pretrain.batch_size=2", "pretrain.max_steps=3", "pretrain.eval_every=0",
                                 "pretrain.dtype=fp32", "pretrain.checkpoint_every=0",
                                 f"runs_dir={json.dumps(str(tmp_path))}", "name=r"])
    ev = pretrain(cfg, progress=False)
    m = ev["metrics"]
    assert m["probe_length"] == 64 and 0.5 < m["probe_repeat_ratio"] < 1.5
    assert {"probe_first_nll", "probe_repeat_nll", "probe_lookup_nll", "probe_lookup_control_nll",
            "probe_lookup_top1"} <= set(m)
    line = get_stage("pretrain").summary(ev)
    assert "copy probe: nll" in line and "record lookup: nll" in line
