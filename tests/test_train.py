"""The training loop: accumulation, precision, schedules, checkpoints, exact resume, NaN stop, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FixedBatches, make_run

from chatforge.config import TrainConfig, load_config
from chatforge.device import resolve_precision
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train import NonFiniteLossError, TrainTask, latest_checkpoint, load_model, save_model, train
from chatforge.train.checkpoint import checkpoint_dirs
from chatforge.train.loop import grad_accum_steps
from chatforge.train.metrics_log import read_metrics
from chatforge.train.schedule import lr_multiplier

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", CPU)
ROOT = Path(__file__).resolve().parents[1]
VOCAB = ByteTokenizer().vocab_size


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_embd=32, n_head=2))


def data(n: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (n * batch, 17), generator=g)
    return [(seq[i * batch:(i + 1) * batch, :-1], seq[i * batch:(i + 1) * batch, 1:]) for i in range(n)]


def lm_loss(model, batch):
    x, y = batch
    return model(x, y, loss_reduction="sum")[1], y.numel()


def task_for(model, batches, micro_tokens, loss=lm_loss, **kw):
    return TrainTask(name="test", model=model, tokenizer=ByteTokenizer(), batches=batches, loss=loss,
                     tokens_per_micro_batch=micro_tokens, **kw)


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=4, lr=1e-2, warmup_steps=0, eval_every=0, checkpoint_every=0, log_every=1,
                schedule="constant", dtype="fp32", grad_clip=0.0)
    return TrainConfig(**{**base, **kw})


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = data(1, 8)
    halves = [(big[0][0][:4], big[0][1][:4]), (big[0][0][4:], big[0][1][4:])]
    m1, m2 = tiny_gpt(), tiny_gpt()
    train(task_for(m1, FixedBatches(big), 8 * 16), cfg(max_steps=1), tmp_path / "a", FP32, progress=False)
    train(task_for(m2, FixedBatches(halves), 4 * 16), cfg(max_steps=1, tokens_per_step=8 * 16), tmp_path / "b",
          FP32, progress=False)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=2e-6, rtol=1e-5, msg=name)


def test_tokens_per_step_must_be_a_multiple():
    with pytest.raises(ConfigError, match=r"pretrain.tokens_per_step: 1000 is not a multiple .* 128"):
        grad_accum_steps(cfg(tokens_per_step=1000), 128, 1, "pretrain")
    assert grad_accum_steps(cfg(tokens_per_step=1024), 128, 2, "pretrain") == 4


def test_bf16_training_tracks_fp32(tmp_path):
    losses = {}
    for dtype in ("fp32", "bf16"):
        m = tiny_gpt()
        train(task_for(m, FixedBatches(data(4, 4)), 64), cfg(max_steps=8, lr=3e-3), tmp_path / dtype,
              resolve_precision(dtype, CPU), progress=False)
        losses[dtype] = [r["loss"] for r in read_metrics(tmp_path / dtype / "metrics.jsonl", "train")]
    assert len(losses["fp32"]) == 8
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) < 0.05 * a


def test_schedules():
    assert lr_multiplier(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, 0, "wsd", 0.0, decay_frac=0.2) == 1.0
    assert lr_multiplier(90, 100, 0, "wsd", 0.0, decay_frac=0.2) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 0, "wsd", 0.0, decay_frac=0.2) == pytest.approx(0.0)
    assert lr_multiplier(70, 100, 5, "constant", 0.0) == 1.0


def test_checkpoints_keep_last_and_load_back(tmp_path):
    m = tiny_gpt()
    res = train(task_for(m, FixedBatches(data(3, 2)), 32), cfg(max_steps=6, checkpoint_every=2, keep_last=2),
                tmp_path, FP32, progress=False)
    steps = [s for s, _ in checkpoint_dirs(tmp_path / "ckpt")]
    assert steps == [4, 6] and res.checkpoint == latest_checkpoint(tmp_path / "ckpt")
    loaded, tok, meta = load_model(res.checkpoint)
    assert meta["step"] == 6 and meta["stage"] == "test" and tok.vocab_size == ByteTokenizer().vocab_size
    for p1, p2 in zip(m.parameters(), loaded.parameters()):
        assert torch.equal(p1, p2)
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_nan_loss_stops_cleanly_and_keeps_last_checkpoint(tmp_path):
    m = tiny_gpt()
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        total, count = lm_loss(model, batch)
        return (total * float("nan") if calls["n"] == 5 else total), count

    task = task_for(m, FixedBatches(data(3, 2)), 32, loss=poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss nan at step 5 .*step_0000004"):
        train(task, cfg(max_steps=10, checkpoint_every=2, keep_last=3), tmp_path, FP32, progress=False)
    ckpt = latest_checkpoint(tmp_path / "ckpt")
    assert ckpt.name == "step_0000004"
    loaded, _, _ = load_model(ckpt)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    # the weights in memory were not updated by the bad step either
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ChatforgeError, match="no checkpoint"):
        train(task_for(tiny_gpt(), FixedBatches(data(1, 2)), 32), cfg(), tmp_path, FP32, resume=True,
              progress=False)


def test_resume_with_a_different_model_config_names_the_field(tmp_path):
    train(task_for(tiny_gpt(), FixedBatches(data(1, 2)), 32), cfg(max_steps=2, checkpoint_every=2), tmp_path,
          FP32, progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    torch.manual_seed(0)
    other = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=3, n_embd=32, n_head=2))
    with pytest.raises(ConfigError, match=r"model.n_layer: checkpoint 2, config 3"):
        train(task_for(other, FixedBatches(data(1, 2)), 32), cfg(max_steps=4), tmp_path, FP32, resume=True,
              progress=False)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert before == after


def test_corrupt_or_incomplete_model_dirs_are_clear_errors(tmp_path):
    d = save_model(tmp_path / "m", tiny_gpt(), ByteTokenizer(), {"stage": "test"})
    load_model(d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ChatforgeError, match=r"model.safetensors: cannot read weights \(corrupt or truncated"):
        load_model(d)
    d2 = save_model(tmp_path / "m2", tiny_gpt(), ByteTokenizer())
    for f in (d2 / "tokenizer").iterdir():
        f.unlink()
    (d2 / "tokenizer").rmdir()
    with pytest.raises(ChatforgeError, match="the tokenizer is missing"):
        load_model(d2)
    with pytest.raises(ChatforgeError, match="directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "m3").mkdir()
    with pytest.raises(ChatforgeError, match="config.json is missing"):
        load_model(tmp_path / "m3")


def test_save_model_is_atomic(tmp_path):
    d = save_model(tmp_path / "m", tiny_gpt(0), ByteTokenizer())
    original = (d / "model.safetensors").read_bytes()

    class Boom(ByteTokenizer):
        def save(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tmp_path / "m", tiny_gpt(1), Boom())
    assert (d / "model.safetensors").read_bytes() == original
    assert not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- end-to-end runs of the CLI


def _make_run(runs: Path, name: str) -> None:
    make_run(runs, name)


SETS = ["model.depth=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "pretrain.batch_size=4",
        "pretrain.max_steps=30", "pretrain.eval_every=10", "pretrain.eval_batches=2", "pretrain.log_every=1",
        "pretrain.checkpoint_every=5", "pretrain.warmup_steps=3", "pretrain.dtype=fp32", "pretrain.lr=0.01",
        "pretrain.sample_tokens=8"]


def _cli(runs: Path, name: str, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "chatforge", "pretrain", "--runs-dir", str(runs), "--name", name]
    for s in SETS:
        args += ["--set", s]
    return args + list(extra)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(runs: Path, name: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(runs / name / "pretrain" / "metrics.jsonl", "train")]


def test_resume_after_sigkill_continues_the_same_curve(tmp_path):
    for name in ("full", "killed"):
        _make_run(tmp_path, name)
    subprocess.run(_cli(tmp_path, "full"), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_cli(tmp_path, "killed"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once past the checkpoint at step 15, before the end
        if metrics.exists() and any(r.get("step", 0) >= 17 for r in read_metrics(metrics, "train")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(tmp_path / "killed" / "pretrain" / "ckpt")
    assert ckpt is not None and 15 <= int(ckpt.name.split("_")[1]) < 30
    subprocess.run(_cli(tmp_path, "killed", "--resume"), check=True, env=_env(), capture_output=True)
    full, resumed = _losses(tmp_path, "full"), _losses(tmp_path, "killed")
    assert [s for s, _ in full] == list(range(1, 31)) == [s for s, _ in resumed]
    assert resumed == full  # bit for bit: same weights, optimizer state, RNG and data order
    ev_full = json.loads((tmp_path / "full" / "pretrain" / "eval.json").read_text())
    ev_res = json.loads((tmp_path / "killed" / "pretrain" / "eval.json").read_text())
    assert ev_full["metrics"]["val_loss"] == ev_res["metrics"]["val_loss"]


def test_resume_from_the_final_checkpoint_finishes_the_stage(tmp_path):
    """Killed after the final checkpoint, before model/ and eval.json were written: --resume runs
    no step but the final evaluation, and writes the eval.json of the uninterrupted run."""
    import shutil

    _make_run(tmp_path, "r")
    done = subprocess.run(_cli(tmp_path, "r"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    stage = tmp_path / "r" / "pretrain"
    full = json.loads((stage / "eval.json").read_text())
    assert latest_checkpoint(stage / "ckpt").name == "step_0000030"
    (stage / "eval.json").unlink()  # the state a kill between the final checkpoint and eval.json leaves
    shutil.rmtree(stage / "model")
    resumed = subprocess.run(_cli(tmp_path, "r", "--resume"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads((stage / "eval.json").read_text())
    assert again["metrics"] == full["metrics"]  # held-out metrics, final train loss and baseline
    assert again["details"]["samples"] == full["details"]["samples"]
    assert again["version"] == full["version"]  # the same weights
    t, t_full = again["train"], full["train"]
    assert t["steps"] == t_full["steps"] == 30 and t["tokens"] == t_full["tokens"]
    # tokens/s counts the training time of every session, not just the resume's
    assert 0.2 < t["tokens_per_s"] / t_full["tokens_per_s"] < 5
    assert "held-out perplexity" in resumed.stdout


def test_ddp_two_processes_match_one(tmp_path):
    for name in ("one", "two"):
        _make_run(tmp_path, name)
    # copy drills are drawn per process (its own rows and seed), so they are off here: this compares the
    # loop's gradient averaging on the same corpus rows
    no_drill = ["--set", "pretrain.copy_drill=0", "--set", "pretrain.copy_drill_warmup=0"]
    one = _cli(tmp_path, "one", "--set", "pretrain.batch_size=4", "--set", "pretrain.max_steps=10", *no_drill)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "chatforge", *_cli(tmp_path, "two", "--set", "pretrain.batch_size=2",
                                    "--set", "pretrain.max_steps=10", *no_drill)[3:]]
    subprocess.run(one, check=True, env=_env(), capture_output=True)
    r = subprocess.run(two, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path, "one"), _losses(tmp_path, "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    for (_, la), (_, lb) in zip(a, b):
        assert math.isclose(la, lb, rel_tol=1e-4), (a, b)
    m1, _, _ = load_model(tmp_path / "one" / "pretrain" / "model")
    m2, _, _ = load_model(tmp_path / "two" / "pretrain" / "model")
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-4, rtol=1e-3)


def test_cli_sample_and_eval_perplexity(tmp_path):
    _make_run(tmp_path, "r")
    subprocess.run(_cli(tmp_path, "r", "--set", "pretrain.max_steps=5"), check=True, env=_env(),
                   capture_output=True)
    model = tmp_path / "r" / "pretrain" / "model"
    out = subprocess.run([sys.executable, "-m", "chatforge", "sample", str(model), "--prompt", "your order",
                          "--max-new-tokens", "10", "--seed", "1"], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "your order" in out.stdout
    text = tmp_path / "held.txt"
    text.write_text("we will refund your order today, thanks for your help with the parcel delivery. " * 5)
    ppl = subprocess.run([sys.executable, "-m", "chatforge", "eval", "perplexity", str(model), "--text", str(text),
                          "--json"], env=_env(), capture_output=True, text=True)
    assert ppl.returncode == 0, ppl.stderr
    res = json.loads(ppl.stdout)
    assert res["val_tokens"] > 0 and 1 < res["val_ppl"] < 300
    too_long = subprocess.run([sys.executable, "-m", "chatforge", "eval", "perplexity", str(model), "--text",
                               str(text), "--block-size", "64"], env=_env(), capture_output=True, text=True)
    assert too_long.returncode == 2 and "larger than the model's context (block_size=32)" in too_long.stderr


def test_pretrain_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"pretrain.schedule: 'linear' is not allowed; allowed: cosine, wsd"):
        load_config(overrides=["pretrain.schedule=linear"])
    with pytest.raises(ConfigError, match=r"pretrain.batch_size: must be >= 1"):
        load_config(overrides=["pretrain.batch_size=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.depht'.*did you mean 'model.depth'"):
        load_config(overrides=["model.depht=3"])


@pytest.mark.parametrize("flags, fast", [({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, True),
                                         ({"avx2", "avx512f", "avx512_bf16"}, False), ({"avx2"}, False)])
def test_auto_precision_picks_bf16_on_cpu_only_with_amx(monkeypatch, flags, fast):
    import chatforge.device as dev

    monkeypatch.setattr(dev, "cpu_flags", lambda: flags)
    assert dev.cpu_has_fast_bf16() is fast
    assert dev.resolve_precision("auto", torch.device("cpu")).name == ("bf16" if fast else "fp32")
    assert dev.resolve_precision("bf16", torch.device("cpu")).name == "bf16"  # forcing it still works


def test_copy_drill_rows_show_random_segments_twice_and_train_only_on_what_copying_predicts():
    from chatforge.train.pretrain import CopyDrill

    block = 300
    drill = CopyDrill(torch.arange(10, 200), block=block, seed=3)
    x, y = drill.rows(3, batch_index=5)
    assert x.shape == y.shape == (3, block)
    assert ((x >= 10) & (x < 200)).all()
    lags = range(CopyDrill.MIN_SEGMENT, CopyDrill.MAX_SEGMENT + 1)
    for k in range(3):
        seq = torch.cat([x[k], y[k, -1:]])
        learned = (y[k] != -1).nonzero().flatten().tolist()
        assert 0.3 < len(learned) / block < 0.5  # about half: the second copies, less their first tokens
        for i in learned:
            assert y[k, i] == seq[i + 1]
            # copying predicts it: the token and the one before it occurred together one segment back
            assert any(i - lag >= 0 and seq[i + 1] == seq[i + 1 - lag] and seq[i] == seq[i - lag] for lag in lags)
        # the first copy of each segment is never a target: the row's first 16 targets are masked
        assert (y[k, :CopyDrill.MIN_SEGMENT] == -1).all()
    again, _ = drill.rows(3, batch_index=5)
    other, _ = drill.rows(3, batch_index=6)
    assert torch.equal(x, again) and not torch.equal(x, other)  # a function of (seed, batch): resumable


def test_copy_drill_settings_are_validated():
    with pytest.raises(ConfigError, match=r"pretrain.copy_drill"):
        load_config(overrides=["pretrain.copy_drill=1.0"])
    with pytest.raises(ConfigError, match=r"pretrain.copy_drill_warmup"):
        load_config(overrides=["pretrain.copy_drill_warmup=1.5"])


def test_drill_batches_come_first_as_short_rows_then_mix_into_corpus_batches():
    from chatforge.train.pretrain import CopyDrill, _DeviceBatches

    class Loader:
        def __next__(self):
            x = torch.full((4, 256), 7)
            return x, x.clone()

        def state_dict(self):
            return {"position": 0}

        def load_state_dict(self, state):
            assert state == {"position": 0}

    drill = CopyDrill(torch.arange(10, 200), block=256, seed=0)
    batches = _DeviceBatches(Loader(), torch.device("cpu"), drill, drill_rows=1, drill_batches=2)
    for _ in range(2):  # warm-up: every row a drill, as rows of CHUNK tokens (same token count)
        x, y = next(batches)
        assert x.shape == (4 * 256 // CopyDrill.CHUNK, CopyDrill.CHUNK) and not (x == 7).any()
    x, y = next(batches)  # then corpus batches whose last row is a drill
    assert x.shape == (4, 256) and (x[:3] == 7).all() and not (x[3] == 7).any()
    state = batches.state_dict()
    assert state["batches_served"] == 3
    batches.load_state_dict(state)
    assert batches.batches == 3
