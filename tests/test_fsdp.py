"""FSDP2 under torchrun (2 CPU processes on gloo) and activation checkpointing.

The torchrun runs are shared by a module fixture: a DDP run and an FSDP run of the same
tiny pre-training (2 micro-batches per step, so FSDP's gradient-sync switching is in play),
each with checkpoints at steps 5 and 10.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_run
from test_train import FP32, VOCAB, _env, _losses, cfg, data, lm_loss, task_for

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train import load_model, train
from chatforge.train.checkpoint import TRAINER_STATE, checkpoint_dirs
from chatforge.train.dist import checkpoint_blocks

SETS = ["model.depth=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "pretrain.batch_size=2",
        "pretrain.grad_accum=2", "pretrain.max_steps=10", "pretrain.eval_every=5", "pretrain.eval_batches=2",
        "pretrain.log_every=1", "pretrain.checkpoint_every=5", "pretrain.warmup_steps=3", "pretrain.dtype=fp32",
        "pretrain.lr=0.01", "pretrain.grad_clip=0.5", "pretrain.sample_tokens=4",
        # copy drills are drawn per process (its own seed): off, so both runs see the same corpus rows
        "pretrain.copy_drill=0", "pretrain.copy_drill_warmup=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(runs: Path, name: str, *extra: str) -> list[str]:
    args = ["-m", "chatforge", "pretrain", "--runs-dir", str(runs), "--name", name]
    for s in SETS:
        args += ["--set", s]
    return args + list(extra)


def _torchrun(runs: Path, name: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *_cli(runs, name, *extra)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def _one_process(runs: Path, name: str, *extra: str) -> None:
    r = subprocess.run([sys.executable, *_cli(runs, name, *extra)], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    for name, parallel in (("ddp", "ddp"), ("fsdp", "fsdp")):
        make_run(root, name)
        _torchrun(root, name, "--set", f"pretrain.parallel={parallel}")
    return root


def _resume_copy(runs: Path, src: str, dst: str) -> None:
    """``dst``: ``src``'s run as a kill right after its step-5 checkpoint leaves it."""
    shutil.copytree(runs / src, runs / dst)
    stage = runs / dst / "pretrain"
    for step, path in checkpoint_dirs(stage / "ckpt"):
        if step > 5:
            shutil.rmtree(path)
    shutil.rmtree(stage / "model")
    (stage / "eval.json").unlink()


def test_fsdp_matches_ddp(runs):
    a, b = _losses(runs, "ddp"), _losses(runs, "fsdp")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    for (_, la), (_, lb) in zip(a, b):
        assert math.isclose(la, lb, rel_tol=1e-4), (a, b)
    grad_norms = [[r["grad_norm"] for r in map(json.loads, (runs / n / "pretrain" / "metrics.jsonl").open())
                   if r.get("kind") == "train"] for n in ("ddp", "fsdp")]
    for ga, gb in zip(*grad_norms):  # the clipped norm is the global one, not a shard's
        assert math.isclose(ga, gb, rel_tol=1e-3)
    # the saved model is a plain single-process model directory with the same weights
    m1, _, _ = load_model(runs / "ddp" / "pretrain" / "model")
    m2, _, c2 = load_model(runs / "fsdp" / "pretrain" / "model")
    assert c2["architecture"] == "gpt"
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-4, rtol=1e-3)
    ev = json.loads((runs / "fsdp" / "pretrain" / "eval.json").read_text())
    assert ev["train"]["world_size"] == 2 and len(ev["details"]["samples"]) > 0  # sampled once, unsharded


def test_fsdp_checkpoints_have_the_single_process_format(runs):
    ddp = torch.load(runs / "ddp" / "pretrain" / "ckpt" / "step_0000010" / TRAINER_STATE, weights_only=False)
    fsdp = torch.load(runs / "fsdp" / "pretrain" / "ckpt" / "step_0000010" / TRAINER_STATE, weights_only=False)
    od, of = ddp["optimizer"], fsdp["optimizer"]
    assert sorted(od["state"]) == sorted(of["state"]) == list(range(len(od["state"])))
    assert [g["params"] for g in od["param_groups"]] == [g["params"] for g in of["param_groups"]]
    for i, s in od["state"].items():
        assert set(s) == set(of["state"][i])
        for k, v in s.items():
            w = of["state"][i][k]
            assert type(w) is torch.Tensor and w.shape == v.shape  # full tensors, not DTensor shards
            torch.testing.assert_close(w, v, atol=1e-4, rtol=1e-2)


def test_fsdp_resume_is_exact_and_checkpoints_move_between_fsdp_and_one_process(runs):
    full = _losses(runs, "fsdp")
    _resume_copy(runs, "fsdp", "fsdp_resumed")
    _torchrun(runs, "fsdp_resumed", "--set", "pretrain.parallel=fsdp", "--resume")
    assert _losses(runs, "fsdp_resumed") == full  # bit for bit
    ev_full = json.loads((runs / "fsdp" / "pretrain" / "eval.json").read_text())
    ev_res = json.loads((runs / "fsdp_resumed" / "pretrain" / "eval.json").read_text())
    assert ev_res["metrics"]["val_loss"] == ev_full["metrics"]["val_loss"]
    assert ev_res["version"] == ev_full["version"]  # the same final weights
    # the FSDP checkpoint resumes in one process with batch 4 = 2 ranks x 2 (the same global batch)
    _resume_copy(runs, "fsdp", "one_resumed")
    _one_process(runs, "one_resumed", "--set", "pretrain.batch_size=4", "--resume")
    for (s1, l1), (s2, l2) in zip(_losses(runs, "one_resumed"), full):
        assert s1 == s2 and math.isclose(l1, l2, rel_tol=1e-4)


# --------------------------------------------------------------------------- activation checkpointing


def _grads(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(5)  # dropout masks
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_embd=32, n_head=2, dropout=0.1))
    (x, y), = data(1, 4)
    loss, grads = _grads(model, x, y)
    undo = checkpoint_blocks(model)
    seen = []
    hook = model.blocks[0].mlp.register_forward_hook(lambda m, a, o: seen.append(torch.is_grad_enabled()))
    loss_ck, grads_ck = _grads(model, x, y)
    assert len(seen) == 2  # the block's MLP ran twice: the forward, and its recomputation in backward
    undo()
    hook.remove()
    assert "forward" not in model.blocks[0].__dict__
    assert loss_ck == loss  # dropout replays the same masks in the recomputation
    for g, gc in zip(grads, grads_ck):
        torch.testing.assert_close(gc, g, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # eval/generation: no checkpointing machinery
        checkpoint_blocks(model)
        model.eval()
        logits, _ = model(x)
        assert logits.shape == (4, 16, VOCAB)


def test_training_with_activation_checkpointing_follows_the_same_curve(tmp_path):
    batches = data(4, 4)
    results = []
    for flag in (False, True):
        from test_train import FixedBatches, tiny_gpt

        model = tiny_gpt(0)
        results.append(train(task_for(model, FixedBatches(batches), 64, loss=lm_loss),
                             cfg(max_steps=4, log_every=1, activation_checkpointing=flag),
                             tmp_path / str(flag), FP32, progress=False))
        assert "forward" not in model.blocks[0].__dict__  # undone after training
    plain, ck = (_losses_of(tmp_path / str(f)) for f in (False, True))
    assert len(plain) == 4
    for a, b in zip(plain, ck):
        assert math.isclose(a, b, rel_tol=1e-5)


def _losses_of(out: Path) -> list[float]:
    from chatforge.train.metrics_log import read_metrics

    return [r["loss"] for r in read_metrics(out / "metrics.jsonl", "train")]


def test_a_ddp_checkpoint_resumes_under_fsdp(runs):
    _resume_copy(runs, "ddp", "ddp_to_fsdp")
    _torchrun(runs, "ddp_to_fsdp", "--set", "pretrain.parallel=fsdp", "--resume")
    for (s1, l1), (s2, l2) in zip(_losses(runs, "ddp_to_fsdp"), _losses(runs, "ddp")):
        assert s1 == s2 and math.isclose(l1, l2, rel_tol=1e-4)


def test_fsdp_refuses_what_it_does_not_support():
    from chatforge.config import load_config
    from chatforge.device import Precision
    from chatforge.errors import ConfigError
    from chatforge.train.loop import check_fsdp

    with pytest.raises(ConfigError, match=r"pretrain.parallel: 'zero3' is not allowed; allowed: ddp, fsdp"):
        load_config(overrides=["pretrain.parallel=zero3"])
    with pytest.raises(ConfigError, match="optimizer=muon"):
        check_fsdp(cfg(optimizer="muon"), FP32, "pretrain")
    with pytest.raises(ConfigError, match="fp16 needs a loss scaler"):  # fp16 is CUDA-only; the check is not
        check_fsdp(cfg(), Precision(torch.device("cpu"), torch.float16), "pretrain")
