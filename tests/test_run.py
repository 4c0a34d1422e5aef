"""Run manifest: stages re-run only when their config or inputs change."""

import json

import pytest

from chatforge.config import load_config
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_write
from chatforge.run import RunDir, Stage, run_stages


def _stages(calls):
    """Two toy stages: 'upper' reads in.txt, 'count' reads upper's output."""

    def upper(cfg):
        calls.append("upper")
        text = (cfg.run_dir / "in.txt").read_text()
        with atomic_write(cfg.run_dir / "upper.txt") as f:
            f.write(text.upper() * cfg.clean.min_words)
        return {"chars": len(text)}

    def count(cfg):
        calls.append("count")
        n = len((cfg.run_dir / "upper.txt").read_text())
        if n > 1000:
            raise ChatforgeError("too long")
        with atomic_write(cfg.run_dir / "count.txt") as f:
            f.write(str(n))
        return {"n": n}

    return [
        Stage("upper", ("clean",), lambda c: [c.run_dir / "in.txt"], lambda c: [c.run_dir / "upper.txt"], upper),
        Stage("count", ("shard",), lambda c: [c.run_dir / "upper.txt"], lambda c: [c.run_dir / "count.txt"], count),
    ]


@pytest.fixture
def cfg(tmp_path):
    c = load_config(overrides=[f"runs_dir={json.dumps(str(tmp_path))}", 'name="r"', "clean.min_words=2"])
    c.run_dir.mkdir(parents=True)
    (c.run_dir / "in.txt").write_text("abc")
    return c


def test_skips_up_to_date_stages_and_reruns_on_change(cfg):
    calls = []
    stages = _stages(calls)
    results = run_stages(cfg, stages)
    assert [r.status for r in results] == ["ran", "ran"] and calls == ["upper", "count"]
    assert (cfg.run_dir / "count.txt").read_text() == "6"

    calls.clear()
    assert [r.status for r in run_stages(cfg, stages)] == ["skipped", "skipped"] and calls == []

    # A config change in upper's section re-runs upper; its new output re-runs count.
    cfg.clean.min_words = 3
    results = run_stages(cfg, stages)
    assert [(r.status, r.reason) for r in results] == [("ran", "config changed"), ("ran", "inputs changed")]

    # A config change in a section upper does not read re-runs only count.
    calls.clear()
    cfg.shard.seed = 7
    run_stages(cfg, stages)
    assert calls == ["count"]

    # Changing an input file re-runs the stage that reads it.
    calls.clear()
    (cfg.run_dir / "in.txt").write_text("abcd")
    run_stages(cfg, stages)
    assert calls == ["upper", "count"]

    # A deleted output re-runs its stage only.
    calls.clear()
    (cfg.run_dir / "count.txt").unlink()
    results = run_stages(cfg, stages)
    assert calls == ["count"] and results[1].reason == "outputs missing or changed"

    calls.clear()
    run_stages(cfg, stages, force=["upper"])
    assert calls == ["upper"]  # same output bytes, so count stays up to date


def test_manifest_records_config_versions_metrics(cfg):
    run_stages(cfg, _stages([]))
    m = json.loads((cfg.run_dir / "manifest.json").read_text())
    assert m["config"]["clean"]["min_words"] == 2
    assert {"chatforge", "torch", "python"} <= set(m["versions"])
    rec = m["stages"]["upper"]
    assert rec["metrics"] == {"chars": 3} and rec["wall_time_s"] >= 0
    assert list(rec["inputs"].values())[0].startswith("sha256:")


def test_failed_stage_keeps_earlier_outputs_and_manifest(cfg):
    run_stages(cfg, _stages([]))
    before_manifest = (cfg.run_dir / "manifest.json").read_text()
    before_count = (cfg.run_dir / "count.txt").read_text()
    (cfg.run_dir / "in.txt").write_text("x" * 600)  # upper writes 1200 chars: count fails
    with pytest.raises(ChatforgeError, match="too long"):
        run_stages(cfg, _stages([]))
    assert (cfg.run_dir / "count.txt").read_text() == before_count
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["count"] == json.loads(before_manifest)["stages"]["count"]
    assert not [p for p in cfg.run_dir.iterdir() if p.name.endswith(".tmp")]


def test_bad_force_and_corrupt_manifest(cfg):
    with pytest.raises(ChatforgeError, match="unknown stage"):
        run_stages(cfg, _stages([]), force=["nope"])
    (cfg.run_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ChatforgeError, match="corrupt manifest"):
        RunDir(cfg.run_dir)
