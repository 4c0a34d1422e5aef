"""End to end: the pipeline on SupportWorld, as a user runs it (a smaller corpus and fewer steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SETS = ["supportworld.corpus_mb=0.6", "supportworld.n_reviews=300", "supportworld.n_conversations=200",
        "supportworld.n_translations=200", "supportworld.n_products=60", "supportworld.n_customers=80",
        "tokenizer.vocab_size=1024", "pretrain.max_steps=150", "pretrain.eval_every=75",
        "pretrain.checkpoint_every=75", "sft.max_steps=40", "sft.eval_every=0", "sft.eval_generate=8",
        "sft.max_new_tokens=32", "translate.max_steps=40", "translate.eval_every=0", "translate.eval_generate=8",
        "sentiment.max_steps=200", "sentiment.eval_every=0", "intent.max_steps=200", "intent.eval_every=0",
        "tagging.max_steps=250", "tagging.eval_every=0"]
STAGES = ["supportworld", "collect", "clean", "tokenizer", "shard", "pretrain", "sft", "sentiment", "intent",
          "translate", "tagging"]


def chatforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "chatforge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def sets(*extra: str) -> list[str]:
    out = []
    for s in [*SETS, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_pipeline_runs_end_to_end_then_skips_and_survives_bad_input(tmp_path):
    r = chatforge("pipeline", "run", *sets(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "default"
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["stages"]) == STAGES
    for stage in manifest["stages"].values():
        assert stage["wall_time_s"] > 0 and stage["config_hash"]
    assert manifest["versions"]["torch"].startswith("2.13.0")

    report = json.loads((run / "pretrain" / "eval.json").read_text())
    # the model learned more than word frequencies: held-out perplexity well below the unigram baseline
    assert report["val_ppl"] < 0.5 * report["unigram_ppl"], report
    assert len(report["samples"]) == 3 and all(s.strip() for s in report["samples"])
    assert "held-out perplexity" in r.stdout and "unigram baseline" in r.stdout
    for label in ("clean report", "tokenizer", "train/val shards", "pre-trained model", "pretrain report"):
        assert label in r.stdout

    # fine-tuning: classifiers beat the majority class, generative stages report BLEU with its signature
    for stage in ("sentiment", "intent"):
        ev = json.loads((run / "finetune" / stage / "eval.json").read_text())
        assert ev["test_accuracy"] > ev["majority_baseline"] + 0.15, (stage, ev["test_accuracy"])
        assert "forgetting_ppl_change_pct" in ev
    for stage in ("sft", "translate"):
        ev = json.loads((run / "finetune" / stage / "eval.json").read_text())
        assert 1 <= ev["generated"] <= 8 and ev["bleu_signature"].startswith("nrefs:1")
    assert json.loads((run / "finetune" / "tagging" / "eval.json").read_text())["test_entity_f1"] > 0.2
    assert "majority-class baseline" in r.stdout and "forgetting" in r.stdout

    # nothing changed: every stage is skipped
    again = chatforge("pipeline", "run", *sets(), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == len(STAGES), again.stdout

    # a bad config value fails cleanly and leaves the earlier outputs as they were
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    bad = chatforge("pipeline", "run", *sets("clean.minhash_threshold=2"), cwd=tmp_path)
    assert bad.returncode == 2 and "clean.minhash_threshold: must be in (0, 1)" in bad.stderr
    # a stage that fails mid-run (every document dropped) leaves earlier outputs intact too
    bad = chatforge("pipeline", "run", *sets("clean.min_words=100000", "clean.max_words=200000"), cwd=tmp_path)
    assert bad.returncode == 2 and "every one of" in bad.stderr
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert before == after

    # the pre-trained model can be sampled and evaluated from the CLI
    sample = chatforge("sample", str(run / "pretrain" / "model"), "--prompt", "Returns", "--max-new-tokens", "20",
                       "--seed", "0", cwd=tmp_path)
    assert sample.returncode == 0 and "Returns" in sample.stdout
    ppl = chatforge("eval", "perplexity", str(run / "pretrain" / "model"), "--shards", str(run / "data" / "val.bin"),
                    "--json", cwd=tmp_path)
    assert ppl.returncode == 0, ppl.stderr
    assert json.loads(ppl.stdout)["val_ppl"] < report["unigram_ppl"]
