"""The model registry: stages register immutable versions; aliases move with an append-only history."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from helpers import pretrained_run

from chatforge.cli import main
from chatforge.config import load_config
from chatforge.paths import RunPaths
from chatforge.registry import CHAMPION, Registry, RegistryError, parse_time
from chatforge.registry.cli import lineage


def fake(reg: Registry, version: str, name: str = "r", stage: str = "sft", parent: str | None = None) -> None:
    reg.register({"version": version, "name": name, "stage": stage, "stage_dir": f"{name}/finetune/{stage}",
                  "parent": {"version": parent, "stage": "pretrain"} if parent else None,
                  "metrics": {"checks_mean": 0.5}, "primary": {"name": "checks_mean", "value": 0.5, "goal": "max"}})


def test_stages_register_versions_that_later_stages_never_change(tmp_path):
    from chatforge.io import write_jsonl
    from chatforge.train.pretrain import pretrain
    from chatforge.train.stage import run_stage

    runs, base = pretrained_run(tmp_path)
    reg = Registry(runs)
    (first,) = reg.list()
    assert first.name == "r" and first.stage == "pretrain" and first.parent is None
    rec = first.record
    assert rec["stage_dir"] == "r/pretrain" and len(rec["weights_sha256"]) == 64
    assert rec["config"]["pretrain"]["max_steps"] == 10 and rec["config"]["model"]["n_embd"] == 32
    assert {"chatforge", "torch", "python"} <= set(rec["code"]) and rec["metrics"] and rec["data"]
    assert reg.path_of(first.version) == runs / "r" / "pretrain" / "model"

    # a later stage trained from it registers its parent and leaves the parent's weights as they were
    rows = [{"prompt": f"q{i}", "chosen": "yes.", "rejected": "no!"} for i in range(8)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs = json.dumps(str(tmp_path / "pairs.jsonl"))
    dpo = [f"dpo.init_from={json.dumps(str(runs / 'r' / 'pretrain' / 'model'))}", "dpo.max_steps=3",
           "dpo.batch_size=4", "dpo.dtype=fp32", "dpo.eval_every=0", "dpo.checkpoint_every=0",
           "dpo.forgetting_batches=1", "dpo.eval_generate=0",
           *(f"dpo.{s}_data={pairs}" for s in ("train", "val", "test"))]
    ev = run_stage(load_config(overrides=[*base, *dpo]), "dpo", progress=False)
    aligned = reg.get(ev["version"])
    assert aligned.parent == first.version and aligned.stage == "dpo"
    assert [v.version for v in lineage(reg, aligned)] == [aligned.version, first.version]
    assert reg.verify(first.version) and reg.verify(aligned.version)

    # pre-training again: the first model moves to versions/ and the registry still finds it, unchanged
    pretrain(load_config(overrides=[*base, "pretrain.seed=7"]), progress=False)
    second = reg.list(stage="pretrain")[-1]
    assert second.version != first.version
    assert reg.path_of(first.version) == runs / "r" / "pretrain" / "versions" / first.version
    assert reg.verify(first.version) and reg.verify(second.version)


def test_alias_history_is_append_only_and_answers_what_served_when(tmp_path):
    reg = Registry(tmp_path)
    for v in ("aaaa00000001", "aaaa00000002", "aaaa00000003"):
        fake(reg, v)
    log = []
    e1 = reg.set_alias("r", CHAMPION, "aaaa00000001", why="first")
    log.append(reg.log_path.read_bytes())
    time.sleep(0.01)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    e2 = reg.set_alias("r", CHAMPION, "aaaa00000002", why="better checks")
    log.append(reg.log_path.read_bytes())
    reg.set_alias("r", "staging", "aaaa00000003")
    log.append(reg.log_path.read_bytes())
    for earlier, later in zip(log, log[1:]):
        assert later.startswith(earlier)  # nothing written is ever rewritten
    assert e1["previous"] is None and e2["previous"] == "aaaa00000001" and e2["why"] == "better checks"
    assert reg.aliases("r") == {CHAMPION: "aaaa00000002", "staging": "aaaa00000003"}
    assert reg.aliases("r", at=between) == {CHAMPION: "aaaa00000001"}
    assert reg.aliases("r", at=parse_time("2000-01-01")) == {}
    assert reg.resolve("r@champion").version == "aaaa00000002" == reg.resolve("@champion", "r").version
    assert reg.resolve("aaaa00000003").version == "aaaa00000003"

    back = reg.rollback("r")
    assert back["version"] == "aaaa00000001" and reg.aliases("r")[CHAMPION] == "aaaa00000001"
    reg.remove_alias("r", "staging")
    assert "staging" not in reg.aliases("r")
    assert [e["version"] for e in reg.history("r", CHAMPION)] == ["aaaa00000001", "aaaa00000002", "aaaa00000001"]
    assert log[-1] == reg.log_path.read_bytes()[:len(log[-1])]


def test_registry_errors_name_what_is_wrong(tmp_path):
    reg = Registry(tmp_path)
    fake(reg, "bbbb00000001")
    fake(reg, "bbbb00000002")
    fake(reg, "cccc00000001", name="other")
    with pytest.raises(RegistryError, match="ambiguous"):
        reg.get("bbbb")
    with pytest.raises(RegistryError, match="no version 'dddd'"):
        reg.get("dddd")
    with pytest.raises(RegistryError, match=r"r@champion is not set \(aliases of r: none\)"):
        reg.resolve("r@champion")
    with pytest.raises(RegistryError, match="belongs to 'other'"):
        reg.set_alias("r", CHAMPION, "cccc00000001")
    with pytest.raises(RegistryError, match="alias '1x'"):
        reg.set_alias("r", "1x", "bbbb00000001")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback("r")
    reg.set_alias("r", CHAMPION, "bbbb00000001")
    with pytest.raises(RegistryError, match="held nothing before"):
        reg.rollback("r")
    with pytest.raises(RegistryError, match="is r@champion; move the alias first"):
        reg.delete("bbbb00000001")
    with pytest.raises(RegistryError, match="name it in full"):
        reg.delete("bbbb")
    with pytest.raises(RegistryError, match="not an ISO date"):
        parse_time("yesterday")
    # the same version registered twice keeps its first record
    first = reg.get("bbbb00000002").record["registered_at"]
    fake(reg, "bbbb00000002", stage="dpo")
    assert reg.get("bbbb00000002").record["registered_at"] == first and reg.get("bbbb00000002").stage == "sft"


def test_models_cli_and_references_in_serve_and_eval(tmp_path, capsys):
    from chatforge.serve.cli import default_model, registered_dir
    from chatforge.train.pretrain import pretrain

    runs, base = pretrained_run(tmp_path)
    reg = Registry(runs)
    old = reg.list()[0].version
    pretrain(load_config(overrides=[*base, "pretrain.seed=5"]), progress=False)
    new = reg.list()[-1].version
    flags = ["--runs-dir", str(runs), "--name", "r"]

    main(["models", *flags, "list"])
    out = capsys.readouterr().out
    assert old in out and new in out and "pretrain" in out
    main(["models", *flags, "promote", old, "--why", "the first one"])
    assert f"r@champion: (unset) -> {old}" in capsys.readouterr().out
    assert default_model(runs / "r") == runs / "r" / "pretrain" / "versions" / old  # serve's default
    assert registered_dir(Path("r@champion"), RunPaths(runs / "r")) == runs / "r" / "pretrain" / "versions" / old
    main(["eval", "perplexity", "@champion", "--name", "r", "--runs-dir", str(runs), "--shards",
          str(runs / "r" / "data" / "val.bin"), "--max-batches", "1"])
    out = capsys.readouterr().out.replace("\n", "")
    assert f"versions/{old}: perplexity" in out  # @champion, not the stage's newest model

    main(["models", *flags, "tag", new, "challenger"])
    main(["models", *flags, "show", "r@challenger", "--json"])
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["version"] == new and shown["aliases"] == ["challenger"] and shown["path"].endswith("pretrain/model")
    main(["models", *flags, "diff", old, new])
    assert "config pretrain.seed" in capsys.readouterr().out
    main(["models", *flags, "history", "--json"])
    events = json.loads(capsys.readouterr().out)
    assert [(e["alias"], e["version"]) for e in events] == [("champion", old), ("challenger", new)]
    main(["models", *flags, "history", "--at", "2000-01-01"])
    assert "r@champion at 2000-01-01: (unset)" in capsys.readouterr().out

    assert main(["models", *flags, "delete", old, "--yes"]) == 2  # an alias holds it: refused
    assert "move the alias first" in capsys.readouterr().err
    main(["models", *flags, "promote", new])
    assert main(["models", *flags, "delete", old]) == 2  # no --yes
    assert (runs / "r" / "pretrain" / "versions" / old).is_dir()
    main(["models", *flags, "delete", old, "--yes", "--why", "superseded"])
    assert not (runs / "r" / "pretrain" / "versions" / old).exists()
    assert [v.version for v in reg.list()] == [new]
    assert reg.events()[-1]["event"] == "delete" and reg.events()[-1]["why"] == "superseded"
    main(["models", *flags, "untag", "challenger"])
    main(["models", *flags, "untag", "champion"])
    capsys.readouterr()
    assert main(["models", *flags, "delete", new, "--yes"]) == 2  # the stage's newest model is kept
    assert "newest model of its stage" in capsys.readouterr().err


def test_the_reports_registry_section_shows_versions_aliases_and_each_rounds_decision(tmp_path):
    from chatforge.report.cli import registry_section
    from chatforge.report.sections import registry_tables

    reg = Registry(tmp_path)
    fake(reg, "eeee00000001")
    fake(reg, "eeee00000002", stage="dpo", parent="eeee00000001")
    reg.set_alias("r", CHAMPION, "eeee00000002")
    reg.record_decision("r", {"round": 2, "decision": "keep", "champion": "eeee00000002",
                              "challenger": "eeee00000001", "reasons": ["checks_mean: may be worse"],
                              "guards": {"checks_mean": {"champion": 0.8, "challenger": 0.7, "diff": -0.1,
                                                         "ci95": [-0.2, -0.05], "n": 40, "tolerance": 0.01,
                                                         "ok": False}},
                              "feedback_sources": ["simulated-reviewer-1"], "held_out": "test.jsonl"})
    section = registry_section(tmp_path, "r")
    versions, decision = registry_tables(section)
    assert [row[:2] for row in versions["rows"]] == [["sft", "eeee00000001"], ["dpo", "eeee00000002"]]
    assert versions["rows"][1][versions["columns"].index("aliases")] == "@champion"
    assert versions["rows"][0][versions["columns"].index("decision")] == "round 2: keep"
    assert decision["title"].startswith("round 2: keep") and decision["rows"][0][-1] == "may be worse"
    assert "simulated-reviewer-1" in decision["note"]
    assert registry_section(tmp_path, "nobody") is None


def test_mlflow_mirror_copies_versions_aliases_and_decisions_idempotently(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'chatforge[mlflow]')")
    pytest.importorskip("alembic", reason="MLflow's SQLite store needs alembic (the mlflow extra)")
    from mlflow.tracking import MlflowClient

    from chatforge.registry.mlflow_mirror import mirror

    reg = Registry(tmp_path / "runs")
    fake(reg, "aaaa11112222", stage="pretrain")
    fake(reg, "bbbb11112222", parent="aaaa11112222")
    reg.set_alias("r", CHAMPION, "bbbb11112222", why="first chat model")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = mirror(reg, uri)
    assert out["models"]["r"] == {"created": 2, "existing": 0, "aliases_set": 1, "aliases_removed": 0}
    client = MlflowClient(tracking_uri=uri)
    by_tag = {mv.tags["chatforge.version"]: mv for mv in client.search_model_versions("name='r'")}
    assert set(by_tag) == {"aaaa11112222", "bbbb11112222"}
    assert client.get_model_version_by_alias("r", CHAMPION).version == by_tag["bbbb11112222"].version
    run = client.get_run(by_tag["bbbb11112222"].run_id)
    assert run.data.tags["chatforge.parent"] == "aaaa11112222" and run.data.metrics["checks_mean"] == 0.5
    # a second mirror adds nothing; an alias move, a new version and a decision follow it there
    assert mirror(reg, uri)["models"]["r"] == {"created": 0, "existing": 2, "aliases_set": 0, "aliases_removed": 0}
    fake(reg, "cccc11112222", stage="dpo", parent="bbbb11112222")
    reg.record_decision("r", {"round": 2, "decision": "keep", "champion": "bbbb11112222",
                              "challenger": "cccc11112222", "reasons": ["no_leak worse"]})
    reg.set_alias("r", "challenger", "cccc11112222")
    reg.remove_alias("r", CHAMPION)
    assert mirror(reg, uri)["models"]["r"] == {"created": 1, "existing": 2, "aliases_set": 1, "aliases_removed": 1}
    rm = client.get_registered_model("r")
    assert set(rm.aliases) == {"challenger"}
    history = json.loads(rm.tags["chatforge.alias_history"])
    assert [(h["alias"], h["version"]) for h in history] == [(CHAMPION, "bbbb11112222"),
                                                              ("challenger", "cccc11112222"), (CHAMPION, None)]
    chall = client.get_model_version_by_alias("r", "challenger")
    assert chall.tags["chatforge.decision.2"].startswith("keep vs bbbb11112222: no_leak worse")


def test_mlflow_mirror_needs_a_uri(tmp_path, monkeypatch):
    from chatforge.errors import ChatforgeError
    from chatforge.registry.mlflow_mirror import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ChatforgeError, match="no MLflow tracking URI"):
        tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking_uri(None) == "sqlite:///x.db" and tracking_uri("http://h:5000") == "http://h:5000"


def test_pipeline_config_can_ask_for_the_mlflow_mirror(tmp_path, capsys):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'chatforge[mlflow]')")
    pytest.importorskip("alembic", reason="MLflow's SQLite store needs alembic (the mlflow extra)")
    from chatforge.cli import _mirror_to_mlflow

    runs = tmp_path / "runs"
    fake(Registry(runs), "dddd11112222", stage="pretrain")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(None, overrides=[f"runs_dir={json.dumps(str(runs))}", 'name="r"',
                                       f"registry.mlflow_uri={json.dumps(uri)}"])
    _mirror_to_mlflow(cfg)
    assert "model 'r': 1 versions added" in capsys.readouterr().out
    _mirror_to_mlflow(load_config(None, overrides=[f"runs_dir={json.dumps(str(runs))}"]))  # off: nothing printed
    assert "MLflow" not in capsys.readouterr().out
