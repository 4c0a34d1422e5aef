"""Blind reviewer comparison of an aligned model against its parent: queued in the feedback store,
shown without model names in a shuffled order, read back as a win rate with its interval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.align.review import comparison_result, parent_of, queue_comparison, wilson
from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.io import write_jsonl
from chatforge.model import GPT, GPTConfig
from chatforge.store.db import Store
from chatforge.store.service import create_user, next_assignment, submit_ranking
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import model_version, save_model

TOK = ByteTokenizer()


def _model(run: Path, stage_dir: str, stage: str, answers: list[str], parent: dict | None, seed: int) -> Path:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=TOK.vocab_size, block_size=32))
    model = run / stage_dir / "model"
    save_model(model, gpt, TOK, {"stage": stage, "task": "chat", "parent": parent})
    write_jsonl(run / stage_dir / "answers.jsonl",
                [{"where": f"test.jsonl:{i + 1}", "prompt": [{"role": "user", "content": f"question {i}"}],
                  "answer": a} for i, a in enumerate(answers)])
    return model


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "default"
    sft = _model(run, "finetune/sft", "sft", [f"sft answer {i}" for i in range(6)], None, 0)
    _model(run, "align/dpo", "dpo", [f"dpo answer {i}" for i in range(5)] + ["sft answer 5"],
           {"stage": "sft", "version": model_version(sft), "path": "finetune/sft/model"}, 1)
    return run


def test_a_blind_comparison_is_queued_judged_and_read_back(run: Path):
    dpo, sft = run / "align/dpo/model", run / "finetune/sft/model"
    assert parent_of(dpo) == sft.resolve()
    store = Store(f"sqlite:///{run / 'feedback.db'}")
    users = {name: create_user(store, name, "pw-" + name * 3, role)
             for name, role in (("admin", "admin"), ("ann", "reviewer"), ("bob", "reviewer"))}
    out = queue_comparison(store, dpo, sft, ["ann", "bob"], n_prompts=0, overlap=2)
    assert out["prompts"] == 5  # the sixth prompt got the same answer from both: nothing to compare
    assert out["assignments"] == 10 and out["aligned"].startswith("dpo@") and out["parent"].startswith("sft@")
    # each reviewer ranks: ann prefers DPO on 4 of 5, bob on 2 of 5
    prefer = {"ann": [True, True, True, True, False], "bob": [True, False, True, False, False]}
    orders_seen = set()
    for name, choices in prefer.items():
        for choice in choices:
            a = next_assignment(store, users[name]["id"], "rank")
            assert set(a["responses"][0]) == {"id", "text"}  # blind: no model name or version is shown
            orders_seen.add(tuple(r["text"].split()[0] for r in a["responses"]))
            first = [r for r in a["responses"] if r["text"].startswith("dpo" if choice else "sft")]
            rest = [r for r in a["responses"] if r not in first]
            submit_ranking(store, users[name]["id"], a["assignment_id"], [r["id"] for r in first + rest])
    assert next_assignment(store, users["ann"]["id"], "rank") is None
    assert len(orders_seen) == 2  # the two answers are shown in both orders
    result = comparison_result(store, out["dataset"])
    store.close()
    assert result["judgements"] == 10 and result["aligned_wins"] == 6 and result["win_rate"] == 0.6
    assert result["interval_95"] == pytest.approx(list(wilson(6, 10)))
    assert 0.3 < result["interval_95"][0] < 0.6 < result["interval_95"][1] < 0.9
    # ann and bob order 3 of the 5 prompts the same way
    assert result["pairwise_agreement"] == pytest.approx(3 / 5) and result["agreement_prompts"] == 5


def test_the_cli_queues_and_reports(run: Path, capsys, monkeypatch):
    runs = run.parent
    store = Store(f"sqlite:///{run / 'feedback.db'}")
    create_user(store, "admin", "pw-adminadmin", "admin")
    rev = create_user(store, "rev", "pw-revrevrev", "reviewer")
    store.close()
    assert main(["align", "compare", "queue", "dpo", "--runs-dir", str(runs), "--reviewers", "rev", "--prompts", "3"]) == 0
    said = capsys.readouterr().out
    assert "3 prompts, 3 ranking assignments for rev" in said
    name = said.split("in dataset '")[1].split("'")[0]
    main(["align", "compare", "result", name, "--runs-dir", str(runs)])
    assert "no judgements yet" in capsys.readouterr().out
    store = Store(f"sqlite:///{run / 'feedback.db'}")
    for _ in range(3):
        a = next_assignment(store, rev["id"], "rank")
        submit_ranking(store, rev["id"], a["assignment_id"],
                       [r["id"] for r in sorted(a["responses"], key=lambda r: not r["text"].startswith("dpo"))])
    store.close()
    main(["align", "compare", "result", name, "--runs-dir", str(runs), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["aligned_wins"] == result["judgements"] == 3
    assert main(["align", "compare", "result", "nope", "--runs-dir", str(runs)]) == 2
    assert "no feedback dataset named 'nope'" in capsys.readouterr().err


def test_models_without_answers_or_differences_are_refused(run: Path, tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    create_user(store, "admin", "pw-adminadmin", "admin")
    sft = run / "finetune/sft/model"
    with pytest.raises(ChatforgeError, match="answered no held-out prompt differently"):
        queue_comparison(store, sft, sft, ["admin"], 5)
    (run / "align/dpo/answers.jsonl").unlink()
    with pytest.raises(ChatforgeError, match="no held-out answers"):
        queue_comparison(store, run / "align/dpo/model", sft, ["admin"], 5)
    store.close()
