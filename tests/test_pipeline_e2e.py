"""End to end: the pipeline on SupportWorld, as a user runs it (a smaller corpus and fewer steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SETS = ["supportworld.corpus_mb=0.6", "supportworld.n_reviews=1500", "supportworld.n_conversations=600",
        "supportworld.n_translations=200", "supportworld.n_products=60", "supportworld.n_customers=80",
        "tokenizer.vocab_size=1024", "pretrain.max_steps=150", "pretrain.eval_every=75",
        "pretrain.checkpoint_every=75", "sft.max_steps=40", "sft.eval_every=0", "sft.eval_generate=8",
        "sft.max_new_tokens=32", "translate.max_steps=40", "translate.eval_every=0", "translate.eval_generate=8",
        "sentiment.max_steps=150", "sentiment.eval_every=0", "intent.max_steps=200", "intent.eval_every=0",
        "tagging.max_steps=250", "tagging.eval_every=0", "reward.max_steps=10", "reward.eval_every=0",
        "reward.train_pairs=80", "reward.eval_pairs=32", "dpo.max_steps=10", "dpo.eval_every=0",
        "dpo.train_pairs=80", "dpo.eval_pairs=16", "dpo.eval_generate=8", "dpo.max_new_tokens=32",
        "supportworld.n_moderation=40", "supportworld.n_redteam=16",
        "moderation.max_steps=100", "moderation.eval_every=0"]
STAGES = ["supportworld", "collect", "clean", "tokenizer", "shard", "pretrain", "sft", "sentiment", "intent",
          "moderation", "translate", "tagging", "reward", "dpo", "safety"]


def chatforge(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "chatforge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, input=stdin)


def sets(*extra: str) -> list[str]:
    out = ["--name", "other"]  # a named run: every later command must reach it with --name
    for s in [*SETS, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_pipeline_runs_end_to_end_then_skips_and_survives_bad_input(tmp_path):
    r = chatforge("pipeline", "run", *sets(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "other"
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["stages"]) == STAGES
    for stage in manifest["stages"].values():
        assert stage["wall_time_s"] > 0 and stage["config_hash"]
    assert manifest["versions"]["torch"].startswith("2.13.0")

    ev = json.loads((run / "pretrain" / "eval.json").read_text())
    report = ev["metrics"]
    # the model learned more than word frequencies: held-out perplexity well below the unigram baseline
    assert report["val_ppl"] < 0.5 * report["unigram_ppl"], report
    samples = ev["details"]["samples"]
    assert len(samples) == 3 and all(s.strip() for s in samples)
    assert ev["primary"] == {"name": "val_ppl", "value": report["val_ppl"], "goal": "min"} and ev["parent"] is None
    assert "held-out perplexity" in r.stdout and "unigram baseline" in r.stdout
    assert "probe_repeat_ratio" in report and "copy probe: nll" in r.stdout  # in-context copying, after pre-training
    for label in ("clean report", "tokenizer", "train/val shards", "pre-trained model", "pretrain report"):
        assert label in r.stdout
    # the main job ends with the report card, one self-contained file
    assert "Report card" in r.stdout and (run / "report" / "report.html").is_file() and (run / "report" / "report.md").is_file()

    # safety: moderation quality per category and layer, the red-team rate of the chat models, the bias
    # probes of the base, chat and aligned models; the report shows them
    mod = json.loads((run / "safety" / "moderation.json").read_text())
    assert set(mod["result"]["layers"]) == {"rules", "classifier", "both"}
    assert "customer_data" in mod["result"]["layers"]["both"]["per_category"]
    for name in ("sft", "dpo"):
        red = json.loads((run / "safety" / f"redteam-{name}.json").read_text())["result"]
        assert red["n"] == 16 and all(0 <= red[k]["rate"] <= 1 for k in ("unsafe", "unsafe_guarded", "refused"))
    assert {p.name.split("-")[1] for p in (run / "safety").glob("bias-*.json")} == {"pretrain", "sft", "dpo"}
    assert "Red team: sft (16 prompts)" in (run / "report" / "report.md").read_text()

    # fine-tuning: classifiers beat the majority class, generative stages report BLEU with its signature
    def metrics(stage: str) -> dict:
        ev = json.loads((run / "finetune" / stage / "eval.json").read_text())
        # one schema: every fine-tuned model names its parent, the pre-trained model
        assert ev["parent"] == {"stage": "pretrain", "version": json.loads(
            (run / "pretrain" / "model" / "config.json").read_text())["version"], "path": "pretrain/model"}
        assert ev["primary"]["name"] in ev["metrics"] and set(ev["data"]) == {"train", "val", "test"}
        return {**ev["metrics"], **ev["details"]}

    for stage in ("sentiment", "intent"):
        m = metrics(stage)
        assert m["test_accuracy"] > m["majority_baseline"] + 0.15, (stage, m["test_accuracy"])
        assert "forgetting_ppl_change_pct" in m and 0 < m["tfidf_logreg_accuracy"] <= 1
    for stage in ("sft", "translate"):
        m = metrics(stage)
        assert 1 <= m["generated"] <= 8 and m["bleu_signature"].startswith("nrefs:1")
    assert metrics("sft")["checked"] >= 1 and "SupportWorld checks on" in r.stdout
    assert "TF-IDF + logistic regression" in r.stdout
    assert metrics("tagging")["test_entity_f1"] > 0.2
    assert "majority-class baseline" in r.stdout and "forgetting" in r.stdout

    # alignment: the reward model and DPO start from the chat model
    rm = json.loads((run / "align" / "reward" / "eval.json").read_text())
    assert rm["parent"]["stage"] == "sft" and rm["metrics"]["test_pairs"] == 32 and rm["task"] == "reward"
    flat = " ".join(r.stdout.split())  # the console wraps long report lines
    assert "held-out pairwise accuracy" in flat
    # DPO starts from the chat model (also its reference) and reports TRL's reward metrics
    dpo = json.loads((run / "align" / "dpo" / "eval.json").read_text())
    assert dpo["parent"]["stage"] == "sft" and dpo["parent"]["path"] == "finetune/sft/model"
    assert dpo["train"]["train_pairs"] == 80 and dpo["metrics"]["test_pairs"] == 16
    assert 0 <= dpo["metrics"]["test_reward_accuracy"] <= 1 and "held-out pairs: reward accuracy" in flat
    # the same held-out prompts as SFT's test, so the summary shows the checks before and after
    assert set(dpo["details"]["parent_checks"]) <= set(dpo["metrics"]) and "(SFT " in flat
    # and against the SFT model: answer length, KL per token, the reward model's win rate
    assert dpo["metrics"]["test_kl_from_parent"] >= 0 and 0 <= dpo["metrics"]["test_rm_win_rate"] <= 1
    assert "KL from SFT" in flat and "reward-model win rate vs SFT" in flat

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

    # the named run's models are reached with --name: sample, evaluate, chat
    assert "chatforge serve --name other" in r.stdout
    sample = chatforge("sample", "--name", "other", "--prompt", "Returns", "--max-new-tokens", "20", "--seed", "0",
                       cwd=tmp_path)
    assert sample.returncode == 0 and "Returns" in sample.stdout, sample.stderr
    ppl = chatforge("eval", "perplexity", "--name", "other", "--shards", str(run / "data" / "val.bin"), "--json",
                    cwd=tmp_path)
    assert ppl.returncode == 0, ppl.stderr
    result = json.loads(ppl.stdout)
    assert result["val_ppl"] < report["unigram_ppl"] and result["model"] == str(Path("runs/other/pretrain/model"))
    # the run's shards.json stands for its validation shards
    summary = chatforge("eval", "perplexity", "--name", "other", "--shards", str(run / "data" / "shards.json"),
                        "--json", cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    same = json.loads(summary.stdout)  # the same tokens (two processes may round the bf16 sums differently)
    assert same["val_tokens"] == result["val_tokens"] and same["val_ppl"] == pytest.approx(result["val_ppl"], rel=1e-4)
    checks = chatforge("eval", "checks", "--name", "other", "--limit", "3", "--max-new-tokens", "16", "--json",
                       cwd=tmp_path)
    assert checks.returncode == 0, checks.stderr
    checked = json.loads(checks.stdout)
    assert checked["answers"] + checked["skipped"] == 3 and checked["model"] == str(Path("runs/other/finetune/sft/model"))
    probed = chatforge("eval", "probe", "--name", "other", "--json", cwd=tmp_path)
    assert probed.returncode == 0 and "repeat_ratio" in json.loads(probed.stdout), probed.stderr
    chat = chatforge("chat", "--name", "other", "--max-new-tokens", "8", cwd=tmp_path, stdin="hello\n/quit\n")
    assert chat.returncode == 0 and "assistant>" in chat.stdout, chat.stderr
    missing = chatforge("chat", "--name", "nosuchrun", cwd=tmp_path, stdin="/quit\n")
    assert missing.returncode == 2 and "no sft model in run 'nosuchrun'" in missing.stderr

    # every stage's model is registered, with its parent: pretrain -> sft -> dpo
    listed = chatforge("models", "--name", "other", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    by_stage = {v["stage"]: v for v in json.loads(listed.stdout)}
    assert set(by_stage) == {"pretrain", "sft", "sentiment", "intent", "moderation", "translate", "tagging", "reward",
                            "dpo"}
    assert by_stage["dpo"]["parent"]["version"] == by_stage["sft"]["version"] == dpo["parent"]["version"]
    assert by_stage["sft"]["parent"]["version"] == by_stage["pretrain"]["version"]

    # a round: simulated reviewers through the app, then a challenger from the newest aligned model
    sim = subprocess.run([sys.executable, str(ROOT / "examples" / "simulate_reviewers.py"), "--name", "other",
                          "--prompts", "6", "--samples", "3"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert sim.returncode == 0, sim.stderr[-3000:]
    assert '"simulated-round-2-' in sim.stdout and '"simulated-reviewer-1"' in sim.stdout  # round-K-TIME by default
    rnd = chatforge("round", *sets("round.eval_prompts=8", "round.dpo_steps=3"), cwd=tmp_path)
    assert rnd.returncode == 0, rnd.stdout[-3000:] + rnd.stderr[-3000:]
    decision = json.loads((run / "rounds" / "2" / "decision.json").read_text())
    assert decision["champion"] == by_stage["dpo"]["version"] and decision["prompts"] == 8
    assert decision["decision"] in ("promote", "keep") and len(decision["reasons"]) == 3
    assert decision["feedback_sources"] == ["simulated-reviewer-1", "simulated-reviewer-2", "simulated-reviewer-3"]
    assert (run / "rounds" / "2" / "report" / "report.html").is_file() and "Round 2" in rnd.stdout
    history = json.loads(chatforge("models", "--name", "other", "history", "--json", cwd=tmp_path).stdout)
    assert [e["alias"] for e in history if e["event"] == "alias"][:2] == ["champion", "challenger"]
    assert any(e["event"] == "decision" and e["challenger"] == decision["challenger"] for e in history)
