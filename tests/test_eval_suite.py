"""The evaluation suite: task files scored per choice, contamination, run_suite and `eval suite --against`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_PRETRAIN, make_run, tiny_byte_gpt

from chatforge.cli import main
from chatforge.config import SupportWorldConfig
from chatforge.data.supportworld import generate
from chatforge.errors import DataError
from chatforge.eval import contamination, tasks
from chatforge.eval.suite import compare, run_suite, suite_path
from chatforge.eval.supportworld_task import build_rows
from chatforge.io import read_jsonl, write_jsonl
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import load_model, model_version, save_model

TOK = ByteTokenizer()


def random_gpt(seed: int):
    """A tiny byte GPT with random weights everywhere (a fresh GPT's zero head makes every token tie)."""
    model = tiny_byte_gpt(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def hand_loglik(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Sum of log p(continuation token | everything before it), from one plain forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)
    positions = range(len(ids) - n_cont, len(ids))
    total = sum(float(logp[i - 1, ids[i]]) for i in positions)
    greedy = all(float(logp[i - 1, ids[i]]) >= float(logp[i - 1].max()) for i in positions)
    return total, greedy


def test_task_scores_equal_a_hand_computation(tmp_path):
    model = random_gpt(3)
    rows = [{"context": "Where is my parcel?", "choices": ["Shipped.", "It is lost, sorry", "x"], "gold": 1},
            {"query": "Refunds take ", "choices": ["5 days", "ten business days"], "gold": 0, "id": "r2"}]
    path = tmp_path / "mc.jsonl"
    write_jsonl(path, rows)
    res = tasks.evaluate_task(model, TOK, path)
    assert res["kind"] == "multiple_choice" and res["n"] == 2 and res["examples"][1]["id"] == "r2"
    for row, got in zip(rows, res["examples"]):
        ctx = row.get("context", row.get("query"))
        for choice, ll, n, greedy in zip(row["choices"], got["loglik"], got["tokens"], got["greedy"]):
            # lm-eval's pairing: " " + choice; the context's trailing space moves into the continuation
            ids = TOK.encode(ctx + " " + choice)
            n_cont = len(ids) - len(TOK.encode(ctx.rstrip()))
            want, want_greedy = hand_loglik(model, ids, n_cont)
            assert n == n_cont and ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
        assert got["pred"] == max(range(len(got["loglik"])), key=lambda k: got["loglik"][k])
    # with BOS the context is conditioned on <|bos|> as pre-training documents are
    res = tasks.evaluate_task(model, TOK, path, bos=True)
    ids = [TOK.bos_id, *TOK.encode("Where is my parcel? Shipped.")]
    assert res["examples"][0]["loglik"][0] == pytest.approx(hand_loglik(model, ids, len(" Shipped."))[0], abs=1e-4)


def test_batched_scoring_matches_one_at_a_time(tmp_path):
    model = random_gpt(1)
    reqs = [tasks.Request("a" * k, " b" * (k % 5 + 1)) for k in range(1, 30)]
    batched = tasks.score_requests(model, TOK, reqs, tokens_per_batch=200)  # several padded batches
    for r, s in zip(reqs, batched):
        ids = TOK.encode(r.context + r.continuation)
        assert s.loglik == pytest.approx(hand_loglik(model, ids, len(r.continuation))[0], abs=1e-4)


def test_acc_and_acc_norm_differ_on_a_length_biased_case(tmp_path, monkeypatch):
    # the short choice wins on total log-likelihood, the long one per character (lm-eval's acc_norm)
    path = tmp_path / "mc.jsonl"
    write_jsonl(path, [{"context": "Q", "choices": ["a", "bbbbbbbb"], "gold": 1},
                       {"context": "Q", "choices": ["cc", "d"], "gold": 0}])
    lls = iter([-2.0, -8.0, -3.0, -1.0])
    monkeypatch.setattr(tasks, "score_requests",
                        lambda model, tok, reqs, *a, **k: [tasks.Score(next(lls), 1, False) for _ in reqs])
    res = tasks.evaluate_task(None, TOK, path)
    assert [e["pred"] for e in res["examples"]] == [0, 1]
    assert [e["pred_norm"] for e in res["examples"]] == [1, 1]  # -8/8 > -2/1; -1/1 > -3/2
    assert res["metrics"] == {"acc": 0.0, "acc_norm": 0.5, "acc_bytes": 0.5}


def test_loglikelihood_task_metrics(tmp_path):
    model = random_gpt(2)
    rows = [{"context": "Standard shipping takes", "continuation": " 3 to 5 days."},
            {"context": "Hi", "continuation": " there"}]
    path = tmp_path / "ll.jsonl"
    write_jsonl(path, rows)
    res = tasks.evaluate_task(model, TOK, path)
    lls = [hand_loglik(model, TOK.encode(r["context"] + r["continuation"]), len(r["continuation"]))[0] for r in rows]
    m = res["metrics"]
    assert res["kind"] == "loglikelihood"
    assert m["mean_loglik"] == pytest.approx(sum(lls) / 2, abs=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-4)  # lm-eval's: per example
    assert m["token_perplexity"] == pytest.approx(math.exp(-sum(lls) / (13 + 6)), rel=1e-4)  # tokens: bytes
    assert m["acc"] == 0.0  # an untrained model does not produce these continuations greedily


@pytest.mark.parametrize("line, message", [
    ('{"context": "q", "choices": ["a", "b"]}', "missing 'gold'"),
    ('{"context": "q", "choices": ["a", "b"], "gold": 2}', "'gold' must be an integer index"),
    ('{"context": "q", "choices": "a b", "gold": 0}', "'choices' must be a list"),
    ('{"choices": ["a", "b"], "gold": 0}', "missing 'context'"),
    ('{"context": "q"}', "needs 'choices' and 'gold'"),
    ('{"context": "q", "continuation": " a"}', "a loglikelihood row in a multiple_choice task"),
    ('{"context": "q", "choices": ["a", "b"], "gold": true}', "'gold' must be an integer index"),
    ('{"context": 3, "continuation": "a"}', "'context' must be a string"),
    ('not json', "task.jsonl:2"),
])
def test_malformed_task_rows_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    first = '{"context": "ok", "choices": ["a", "b"], "gold": 0}'
    path.write_text(first + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        tasks.load_task(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_packaged_task_is_the_generators_output():
    path = tasks.packaged_task("supportworld_mc")
    assert [r for _, r in read_jsonl(path)] == build_rows()
    task = tasks.load_task("supportworld_mc")
    assert task.kind == "multiple_choice" and len(task.examples) == 200
    with pytest.raises(DataError, match="no packaged task 'nope'"):
        tasks.load_task("nope")


# --------------------------------------------------------------------------- contamination

LONG = ("the parcel left our warehouse on monday and the carrier scanned it at the depot the same evening "
        "so it should reach you within three to five business days")


def test_contamination_counts_exact_near_and_contained_and_excludes_them():
    train = [("t0", "Where is my order #1234?"), ("t1", LONG),
             ("t2", "Some training page. " + "Can I change the address on an order that already shipped? " +
              "More words follow here for the page body and a few more.")]
    heldout = [("exact", "where is my   ORDER #1234?"),  # case and spacing differ only
               ("near", "Hello! " + LONG.replace("business days", "working days")),  # 2 words of 30 differ
               ("contained", "Can I change the address on an order that already shipped?"),
               ("clean", "How do I reset my password without my phone?")]
    report, verdicts = contamination.check({"prompts": heldout}, train, threshold=0.7)
    s = report["sets"]["prompts"]
    assert (s["n"], s["exact"], s["near"], s["contained"], s["clean"]) == (4, 1, 1, 1, 1)
    kinds = [v.kind if v else None for v in verdicts["prompts"]]
    assert kinds == ["exact", "near", "contained", None]
    assert verdicts["prompts"][0].train_id == "t0" and verdicts["prompts"][1].train_id == "t1"
    assert [e["id"] for e in s["examples"]] == ["exact", "near", "contained"]
    assert contamination.exclude(heldout, verdicts["prompts"]) == [heldout[3]]
    report, _ = contamination.check({"prompts": heldout}, train, threshold=0.98)  # stricter: no longer near
    assert report["sets"]["prompts"]["near"] == 0


# --------------------------------------------------------------------------- run_suite and the CLI


@pytest.fixture(scope="module")
def run_with_world(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pre-trained run with SupportWorld conversations, one held-out prompt planted in train."""
    from chatforge.config import load_config
    from chatforge.train.pretrain import pretrain

    runs = tmp_path_factory.mktemp("suite") / "runs"
    run = make_run(runs, "r")
    # a context long enough for SupportWorld's support prompts (records included) in bytes
    overrides = [*[o for o in TINY_PRETRAIN if not o.startswith("model.block_size")], "model.block_size=1024",
                 "pretrain.max_steps=4", f"runs_dir={json.dumps(str(runs))}", "name=r"]
    pretrain(load_config(overrides=overrides), progress=False)
    generate(SupportWorldConfig(seed=11, corpus_mb=0.01, n_products=30, n_customers=60, n_reviews=20,
                                n_conversations=120, n_translations=10, n_candidates=2), run / "supportworld")
    conv = run / "supportworld" / "conversations"
    test_rows = [r for _, r in read_jsonl(conv / "test.jsonl")]
    train_rows = [r for _, r in read_jsonl(conv / "train.jsonl")]
    write_jsonl(conv / "train.jsonl", [*train_rows, test_rows[0]])  # a repeated question, as real corpora have
    return run, run / "pretrain" / "model"


def small_task(tmp: Path) -> Path:
    path = tmp / "tiny_mc.jsonl"
    write_jsonl(path, build_rows(n_products=5))
    return path


def test_run_suite_writes_the_result_with_the_version(run_with_world, tmp_path):
    run, model_dir = run_with_world
    version = model_version(model_dir)
    res = run_suite(model_dir, [small_task(tmp_path)], limit=3, n_prompts=2, max_new_tokens=8, device="cpu")
    path = suite_path(run, version)
    assert res["path"] == str(path) and json.loads(path.read_text()) == json.loads(json.dumps(res))
    assert res["model"]["version"] == version and res["model"]["stage"] == "pretrain"
    from chatforge.registry import Registry  # the result is kept with the version in the registry too

    (kept,) = Registry(run.parent).evals(version)
    assert kept["kind"] == "suite" and kept["result"]["summary"] == res["summary"] and res["registry_eval"]
    sets = res["contamination"]["sets"]
    assert sets["prompts"]["exact"] >= 1 and sets["texts"]["n"] > 0 and "task:tiny_mc" in sets
    planted = str(next(r for _, r in read_jsonl(run / "supportworld" / "conversations" / "test.jsonl"))["id"])
    assert planted in {e["id"] for e in sets["prompts"]["examples"]}
    assert planted not in {p["id"] for p in res["prompts"]}  # excluded from what the model is asked
    assert res["checks"]["answers"] == 3 and res["checks"]["checks"]["all"]["n"] == 3
    assert res["stage"]["matches_version"] and "val_loss" in res["stage"]["metrics"]
    assert res["perplexity"]["val_tokens"] > 0
    assert res["tasks"]["tiny_mc"]["n"] == 10 and len(res["prompts"]) == 2
    assert {"tasks.tiny_mc.acc", "perplexity.val_loss", "stage.val_loss", "checks.all"} <= set(res["summary"])
    again = run_suite(model_dir, [small_task(tmp_path)], limit=0, n_prompts=2, max_new_tokens=8, device="cpu",
                      write=False)
    assert [p["id"] for p in again["prompts"]] == [p["id"] for p in res["prompts"]]  # the fixed set is fixed
    assert [p["answer"] for p in again["prompts"]] == [p["answer"] for p in res["prompts"]]  # greedy


def test_eval_suite_against_prints_deltas(run_with_world, tmp_path, capsys):
    run, model_dir = run_with_world
    model, tok, meta = load_model(model_dir)
    with torch.no_grad():
        model.output_weight.mul_(0.5)  # another version: flatter predictions
    other = save_model(run / "finetune" / "other" / "model", model, tok, {"stage": "other"})
    task = small_task(tmp_path)
    code = main(["eval", "suite", str(model_dir), "--against", str(other), "--tasks", str(task), "--limit", "0",
                 "--prompts", "1", "--max-new-tokens", "4", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "against" in out and "delta" in out and "tasks.tiny_mc.acc" in out
    a = json.loads(suite_path(run, model_version(model_dir)).read_text())
    b = json.loads(suite_path(run, model_version(other)).read_text())
    d = compare(a, b)["perplexity.val_loss"]
    assert d["delta"] == pytest.approx(d["model"] - d["against"]) and d["delta"] != 0
    assert f"{d['delta']:10.4f}".strip() in out


def test_model_outside_a_run_needs_an_output_file(tmp_path):
    d = save_model(tmp_path / "m", tiny_byte_gpt(0), TOK)
    with pytest.raises(Exception, match="--out"):
        run_suite(d, [], device="cpu")
    res = run_suite(d, [], device="cpu", out=tmp_path / "r.json")
    assert res["contamination"] is None and "contamination" in res["skipped"]
    assert json.loads((tmp_path / "r.json").read_text())["model"]["version"] == model_version(d)
