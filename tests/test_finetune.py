"""Fine-tuning stages on a tiny pre-trained model: classification, chat SFT, LoRA, freezing, forgetting."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import make_run

from chatforge.chat.repl import Sampling, chat_loop
from chatforge.config import load_config
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.finetune.classify import load_classifier
from chatforge.finetune.sft import status_stated
from chatforge.io import write_jsonl
from chatforge.stages import get_stage
from chatforge.train.checkpoint import load_model
from chatforge.train.pretrain import pretrain
from chatforge.train.stage import run_stage

TINY = ["model.depth=2", "model.n_embd=32", "model.n_head=2", "model.block_size=96", "pretrain.batch_size=4",
        "pretrain.max_steps=20", "pretrain.eval_every=0", "pretrain.dtype=fp32", "pretrain.checkpoint_every=0"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    make_run(runs, "r")
    cfg = load_config(overrides=[*TINY, f"runs_dir={json.dumps(str(runs))}", "name=r"])
    pretrain(cfg, progress=False)
    return runs


def write_sentiment(d, n=240):
    rng = random.Random(0)
    good, bad = ["great", "lovely", "perfect", "happy"], ["awful", "broken", "terrible", "sad"]
    sets = {}
    for split, m in (("train", n), ("val", 60), ("test", 60)):
        rows = []
        for i in range(m):
            label = rng.choice(["positive", "negative"])
            word = rng.choice(good if label == "positive" else bad)
            rows.append({"id": f"{split}{i}", "text": f"the parcel was {word}, thanks", "label": label})
        write_jsonl(d / f"{split}.jsonl", rows)
        sets[split] = str(d / f"{split}.jsonl")
    return sets


def M(ev):
    """Every number and detail of a stage's eval.json in one dict (the tests read them by name)."""
    return {**ev["metrics"], **ev["details"], **ev["train"], "primary": ev["primary"]["name"]}


def cfg_for(runs, *sets):
    return load_config(overrides=[*TINY, f"runs_dir={json.dumps(str(runs))}", "name=r", *sets])


def classify_sets(data, section="sentiment", **kw):
    base = [f"{section}.train_data={json.dumps(data['train'])}", f"{section}.val_data={json.dumps(data['val'])}",
            f"{section}.test_data={json.dumps(data['test'])}", f"{section}.max_steps=60", f"{section}.eval_every=0",
            f"{section}.dtype=fp32", f"{section}.batch_size=16", f"{section}.lr=3e-3", f"{section}.checkpoint_every=0",
            f"{section}.forgetting_batches=2"]
    return base + [f"{section}.{k}={v}" for k, v in kw.items()]


def test_classifier_learns_and_reports_everything(base_run, tmp_path):
    data = write_sentiment(tmp_path)
    ev = run_stage(cfg_for(base_run, *classify_sets(data)), "sentiment", progress=False)
    metrics = M(ev)
    assert metrics["test_accuracy"] > 0.9 > metrics["majority_baseline"]
    # the classical baseline, fitted on the same training split: one word decides, so it is perfect
    assert metrics["tfidf_logreg_accuracy"] == metrics["tfidf_logreg_macro_f1"] == 1.0
    assert metrics["tfidf_logreg"]["C"] in (1.0, 10.0)
    assert "TF-IDF + logistic regression 1.000 (macro-F1 1.000)" in get_stage("sentiment").summary(ev)
    assert metrics["labels"] == ["negative", "positive"] and len(metrics["confusion"]) == 2
    assert metrics["method"] == "full" and metrics["trainable_params"] == metrics["total_params"]
    assert "forgetting_ppl_change_pct" in metrics
    model, tok, labels = load_classifier(base_run / "r" / "finetune" / "sentiment" / "model")
    ids = torch.tensor([[tok.bos_id, *tok.encode("the parcel was awful, thanks")]])
    assert labels[int(model(ids).argmax())] == "negative"


def test_lora_and_frozen_backbone_train_only_what_they_should(base_run, tmp_path):
    data = write_sentiment(tmp_path)
    base, _, _ = load_model(base_run / "r" / "pretrain" / "model")
    lora = M(run_stage(cfg_for(base_run, *classify_sets(data, lora_r=4)), "sentiment", progress=False))
    assert lora["method"].startswith("LoRA r=4") and lora["trainable_params"] < 0.2 * lora["total_params"]
    frozen = M(run_stage(cfg_for(base_run, *classify_sets(data, freeze="backbone")), "sentiment",
                         progress=False))
    assert frozen["trainable_params"] == 32 * 2 + 2  # the head only: n_embd x classes + bias
    # a frozen backbone leaves the pre-trained weights, and so pre-training perplexity, unchanged
    model, _, _ = load_classifier(base_run / "r" / "finetune" / "sentiment" / "model")
    for (name, p), q in zip(base.named_parameters(), model.backbone.parameters()):
        assert torch.equal(p, q), name
    assert frozen["forgetting_ppl_change_pct"] == pytest.approx(0.0, abs=1e-6)


def test_classifier_bad_labels_are_clear_errors(base_run, tmp_path):
    data = write_sentiment(tmp_path)
    rows = [json.loads(line) for line in Path(data["test"]).read_text().splitlines()]
    rows[3]["label"] = "sarcastic"
    write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DataError, match=r"test.jsonl:4: label 'sarcastic' does not occur in the training data"):
        run_stage(cfg_for(base_run, *classify_sets(data)), "sentiment", progress=False)
    del rows[3]["label"]
    write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DataError, match=r"test.jsonl:4: missing field 'label' \(fields present: id, text\)"):
        M(run_stage(cfg_for(base_run, *classify_sets(data)), "sentiment", progress=False))


def write_chats(d):
    rng = random.Random(1)
    statuses = ["shipped", "delivered", "processing", "cancelled"]
    for split, m in (("train", 200), ("val", 20), ("test", 20)):
        rows = []
        for i in range(m):
            st = rng.choice(statuses)
            rows.append({"id": f"{split}{i}", "intent": "order_status", "record": {"status": st},
                         "messages": [{"role": "system", "content": f"status: {st}"},
                                      {"role": "user", "content": "where is my order?"},
                                      {"role": "assistant", "content": f"Your order is {st}."}]})
        write_jsonl(d / f"{split}.jsonl", rows)
    return {s: str(d / f"{s}.jsonl") for s in ("train", "val", "test")}


def chat_sets(data, **kw):
    """--set overrides for an SFT run on ``write_chats`` data; ``kw`` adds or replaces ``sft.*`` values."""
    base = {"max_steps": 400, "eval_every": 0, "dtype": "fp32", "lr": 3e-3, "checkpoint_every": 0,
            "forgetting_batches": 2, "eval_generate": 20, "max_new_tokens": 24}
    return [f"sft.{k}_data={json.dumps(v)}" for k, v in data.items()] + [
        f"sft.{k}={v}" for k, v in {**base, **kw}.items()]


def test_sft_learns_to_answer_from_the_record_and_end_its_turn(base_run, tmp_path):
    data = write_chats(tmp_path)
    sets = chat_sets(data)
    metrics = M(run_stage(cfg_for(base_run, *sets), "sft", progress=False))
    assert metrics["generated"] == 20 and metrics["status_checked"] == 20
    assert metrics["test_status_correct"] >= 0.8, metrics
    assert metrics["test_bleu"] > 50 and "bleu_signature" in metrics
    answers = [json.loads(line) for line in (base_run / "r" / "finetune" / "sft" / "answers.jsonl").read_text().splitlines()]
    assert all(a["answer"].startswith("Your order is") for a in answers[:5])

    model, tok, meta = load_model(base_run / "r" / "finetune" / "sft" / "model")
    assert meta["task"] == "chat"
    out = io.StringIO()
    inputs = iter(["/system status: delivered", "where is my order?", "/reset", "/bogus", "/quit"])
    convo = chat_loop(model, tok, Sampling(temperature=0.0, max_new_tokens=24), read=lambda _: next(inputs), out=out)
    text = out.getvalue()
    assert "assistant> Your order is delivered." in text
    assert "(conversation reset)" in text and "unknown command '/bogus'" in text
    assert convo == [{"role": "system", "content": "status: delivered"}]


def test_status_check():
    assert status_stated({"status": "out_for_delivery"}, "It is out for delivery today.") is True
    assert status_stated({"status": "shipped"}, "It was delivered.") is False
    assert status_stated({"id": 1}, "anything") is None


def test_finetune_config_errors():
    with pytest.raises(ConfigError, match=r"sentiment.freeze: 'head' is not allowed; allowed: none, embeddings"):
        load_config(overrides=["sentiment.freeze=head"])
    with pytest.raises(ConfigError, match=r"sft.freeze: LoRA already freezes"):
        load_config(overrides=["sft.lora_r=4", "sft.freeze=backbone"])
    with pytest.raises(ConfigError, match=r"intent.pooling: 'max' is not allowed"):
        load_config(overrides=["intent.pooling=max"])
    assert load_config(overrides=["tagging.replay=0.3"]).tagging.replay == 0.3  # the tagger replays too
    with pytest.raises(ConfigError, match=r"tagging.replay: must be in \[0, 1\)"):
        load_config(overrides=["tagging.replay=1"])


def tagging_sets(tmp_path, **kw):
    rng = random.Random(2)
    colors, items = ["red", "blue", "green"], ["mug", "lamp", "scarf"]
    for split, m in (("train", 200), ("val", 30), ("test", 30)):
        rows = []
        for i in range(m):
            c, it = rng.choice(colors), rng.choice(items)
            rows.append({"id": f"{split}{i}", "tokens": ["the", c, it, "is", "nice"],
                         "tags": ["O", "B-COLOR", "B-PRODUCT", "O", "O"]})
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    sets = [f"tagging.{s}_data={json.dumps(str(tmp_path / f'{s}.jsonl'))}" for s in ("train", "val", "test")] + [
        "tagging.max_steps=80", "tagging.eval_every=0", "tagging.dtype=fp32", "tagging.lr=3e-3",
        "tagging.checkpoint_every=0", "tagging.forgetting_batches=2", "tagging.batch_size=16"]
    return sets + [f"tagging.{k}={v}" for k, v in kw.items()]


def test_tagger_learns_bio_spans(base_run, tmp_path):
    sets = tagging_sets(tmp_path)
    metrics = M(run_stage(cfg_for(base_run, *sets), "tagging", progress=False))
    assert metrics["test_entity_f1"] > 0.9, metrics
    assert set(metrics["per_type"]) == {"COLOR", "PRODUCT"}
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    rows[0]["tags"] = rows[0]["tags"][:-1]
    write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(DataError, match=r"test.jsonl:1: 5 tokens but 4 tags"):
        M(run_stage(cfg_for(base_run, *sets), "tagging", progress=False))


def test_prompt_only_scores_each_label_as_the_whole_reply(base_run, tmp_path):
    from chatforge.chat.template import render, render_prompt
    from chatforge.finetune.prompting import label_logprobs, prompt_classify

    model, tok, _ = load_model(base_run / "r" / "pretrain" / "model")
    prompt = render_prompt([{"role": "user", "content": "how was it?"}], tok)
    scores = label_logprobs(model, tok, prompt, ["good", "bad"])
    # reference: the same log-likelihood computed from a full forward pass without padding
    for label, score in zip(["good", "bad"], scores):
        ids = prompt + render([{"role": "assistant", "content": label}], tok).ids[2:]
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x[:, :-1])[0], -1)[0]
        n = len(ids) - len(prompt)
        ref = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert score == pytest.approx(ref, abs=1e-4)
    report = prompt_classify(model, tok, [("x:1", "fine", "good"), ("x:2", "awful", "bad")], ["good", "bad"])
    assert report["n"] == 2 and 0 <= report["accuracy"] <= 1


def test_replay_limits_forgetting(base_run, tmp_path):
    data = write_sentiment(tmp_path)
    plain = M(run_stage(cfg_for(base_run, *classify_sets(data)), "sentiment", progress=False))
    replayed = M(run_stage(cfg_for(base_run, *classify_sets(data, replay=0.2, max_steps=200)), "sentiment",
                           progress=False))
    assert replayed["test_accuracy"] > 0.8, replayed["test_accuracy"]
    assert replayed["forgetting_ppl_change_pct"] < plain["forgetting_ppl_change_pct"]


def test_tagger_replay_limits_forgetting(base_run, tmp_path):
    plain = M(run_stage(cfg_for(base_run, *tagging_sets(tmp_path)), "tagging", progress=False))
    replayed = M(run_stage(cfg_for(base_run, *tagging_sets(tmp_path, replay=0.3)), "tagging", progress=False))
    assert replayed["test_entity_f1"] > 0.9, replayed
    assert replayed["forgetting_ppl_change_pct"] < plain["forgetting_ppl_change_pct"], (plain, replayed)


def test_sft_replay_runs_and_limits_forgetting(base_run, tmp_path):
    sets = chat_sets(write_chats(tmp_path), max_steps=60, eval_generate=4, max_new_tokens=8)
    plain = M(run_stage(cfg_for(base_run, *sets), "sft", progress=False))
    replayed = M(run_stage(cfg_for(base_run, *sets, "sft.replay=0.3"), "sft", progress=False))
    assert replayed["forgetting_ppl_change_pct"] < plain["forgetting_ppl_change_pct"], (plain, replayed)


# --------------------------------------------------------------------------- data-parallel fine-tuning

def _finetune_cli(runs: Path, name: str, stage: str, *sets: str, nproc: int = 1, port: int = 0) -> list[str]:
    import sys

    args = ["-m", "chatforge", "finetune", stage, "--runs-dir", str(runs), "--name", name]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            *args]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from chatforge.train.checkpoint import load_weights_file

    return load_weights_file(model_dir / "model.safetensors")


# sentiment runs without replay: then the backbone's LM head gets no gradient, which DDP must be told about
@pytest.mark.parametrize("stage,replay,port", [("sft", 0.2, 29541), ("sentiment", 0.0, 29542),
                                               ("intent", 0.2, 29544), ("tagging", 0.2, 29543)])
def test_ddp_two_processes_match_one(base_run, tmp_path, stage, replay, port):
    """torchrun with 2 ranks of batch B/2 ends with the weights of one process with batch B."""
    import os
    import shutil
    import subprocess

    if stage == "sft":
        sets = chat_sets(write_chats(tmp_path), max_steps=6, forgetting_batches=1, eval_generate=2, max_new_tokens=4,
                         replay=replay, pack="false")
    elif stage in ("sentiment", "intent"):
        # intent reads the same {"text","label"} rows; what differs is the section and its defaults
        sets = classify_sets(write_sentiment(tmp_path), stage, max_steps=6, replay=replay)
    else:
        sets = tagging_sets(tmp_path, max_steps=6, replay=replay)
    sets = [s for s in sets if not s.startswith(f"{stage}.batch_size=")] + [f"{stage}.dtype=fp32",
                                                                             f"{stage}.checkpoint_every=0"]
    runs = tmp_path / "runs"
    for name in ("one", "two"):
        shutil.copytree(base_run / "r", runs / name, ignore=shutil.ignore_patterns("finetune"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = subprocess.run(_finetune_cli(runs, "one", stage, *sets, f"{stage}.batch_size=8"), env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_finetune_cli(runs, "two", stage, *sets, f"{stage}.batch_size=4", nproc=2, port=port),
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trainable params") == 1  # one report, from rank 0
    a, b = _weights(runs / "one" / "finetune" / stage / "model"), _weights(runs / "two" / "finetune" / stage / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3, msg=lambda m, k=k: f"{stage} {k}: {m}")
    ev = json.loads((runs / "two" / "finetune" / stage / "eval.json").read_text())
    assert ev["train"]["steps"] == 6


# --------------------------------------------------------------------------- parents and lineage


def test_next_round_continues_from_the_chat_model_and_keeps_it(base_run, tmp_path):
    """`chatforge finetune sft --init-from sft --train FEEDBACK.jsonl`: the README's next round."""
    import subprocess
    import sys

    data = write_chats(tmp_path)
    sets = chat_sets(data, max_steps=30, eval_generate=2, max_new_tokens=8)
    first = run_stage(cfg_for(base_run, *sets), "sft", progress=False)
    stage = base_run / "r" / "finetune" / "sft"
    pretrained = json.loads((base_run / "r" / "pretrain" / "model" / "config.json").read_text())["version"]
    assert first["parent"] == {"stage": "pretrain", "version": pretrained, "path": "pretrain/model"}

    feedback = tmp_path / "feedback.jsonl"
    write_jsonl(feedback, [{"messages": [{"role": "system", "content": "status: shipped"},
                                         {"role": "user", "content": "where is it?"},
                                         {"role": "assistant", "content": "Your order is shipped."}]}] * 12)
    args = [sys.executable, "-m", "chatforge", "finetune", "sft", "--init-from", "sft", "--train", str(feedback),
            "--runs-dir", str(base_run), "--name", "r", "--set", "sft.max_steps=5"]
    for s in [*TINY, *sets]:
        if not s.startswith(("sft.max_steps", "sft.train_data")):
            args += ["--set", s]
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads((stage / "eval.json").read_text())
    assert second["parent"] == {"stage": "sft", "version": first["version"], "path": "finetune/sft/model"}
    assert f"from sft model {first['version']}" in r.stdout
    # the model the new one was trained from is kept, under its version, unchanged
    kept = stage / "versions" / first["version"]
    assert json.loads((kept / "config.json").read_text())["version"] == first["version"]
    new_config = json.loads((stage / "model" / "config.json").read_text())
    assert new_config["version"] == second["version"] != first["version"]
    assert new_config["parent"]["version"] == first["version"]
    old, _, _ = load_model(kept)
    assert json.loads((kept / "config.json").read_text())["parent"]["version"] == pretrained  # back to pre-training
    assert old.config.n_embd == 32


def test_init_from_a_bad_value_names_the_field(base_run, tmp_path):
    with pytest.raises(ConfigError, match=r"sentiment.init_from: 'nope' is neither a stage of this run"):
        run_stage(cfg_for(base_run, *classify_sets(write_sentiment(tmp_path)), "sentiment.init_from=nope"),
                  "sentiment", progress=False)


def test_init_from_a_model_directory_in_a_run_without_shards(base_run, tmp_path, capsys):
    """A fresh run that only fine-tunes a model from elsewhere has no pre-training shards: the stage
    trains and says forgetting is not measured (replay, which needs the shards, is a clear error)."""
    model_dir = base_run / "r" / "pretrain" / "model"
    data = classify_sets(write_sentiment(tmp_path), max_steps=5)
    cfg = load_config(overrides=[*TINY, f"runs_dir={json.dumps(str(tmp_path / 'runs'))}", "name=fresh", *data,
                                 f"sentiment.init_from={json.dumps(str(model_dir))}"])
    ev = run_stage(cfg, "sentiment", progress=False)
    assert ev["parent"]["version"] == json.loads((model_dir / "config.json").read_text())["version"]
    assert "pretrain_val_ppl_before" not in ev["metrics"]
    assert "forgetting is not measured" in capsys.readouterr().out
    with pytest.raises(ChatforgeError, match=r"no pre-training shards \(sentiment.replay is 0.2\)"):
        run_stage(load_config(overrides=[*TINY, f"runs_dir={json.dumps(str(tmp_path / 'runs'))}", "name=fresh",
                                         *data, f"sentiment.init_from={json.dumps(str(model_dir))}",
                                         "sentiment.replay=0.2"]), "sentiment", progress=False)
