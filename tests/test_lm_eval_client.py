"""An outside client: lm-evaluation-harness's local-completions against `chatforge serve` gives the
accuracy and per-choice log-likelihoods of chatforge's own task scorer (bench/lm_eval_vs_suite.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from chatforge.eval.supportworld_task import build_rows
from chatforge.io import write_jsonl
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train.checkpoint import save_model

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the bench extra: pip install -e '.[bench]')")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lm_eval_vs_suite.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("lm_eval_vs_suite", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_lm_eval_local_completions_agrees_with_the_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    bench = bench_module()
    tok = bench.bpe_tokenizer(512)  # BPE: tokens cross word boundaries, so the context/continuation split matters
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_embd=32, n_head=2))
    with torch.no_grad():  # random everywhere (init_weights zeroes the head: every choice would tie)
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model_dir = save_model(tmp_path / "model", model, tok)
    task = tmp_path / "mc.jsonl"
    rows = build_rows(n_products=8)  # 16 questions, 64 choices
    rows[0]["context"] += " "  # a trailing space: lm-eval moves it into the continuation, so must we
    write_jsonl(task, rows)
    r = bench.compare(model_dir, task, log_dir=tmp_path)
    assert r["choices"] == 64
    assert r["lm_eval_acc"] == r["chatforge_acc"] and r["lm_eval_acc_norm"] == r["chatforge_acc_norm"]
    assert r["max_abs_loglik_diff"] < bench.TOLERANCE
    assert r["greedy_mismatches"] == 0
