"""Muon + AdamW (``train/optim.py``): the orthogonalisation, the parameter split, AdamW's half
against torch's AdamW, learning in the loop, exact resume and config errors."""

from __future__ import annotations

import pytest
import torch
from helpers import FixedBatches

from chatforge.config import load_config
from chatforge.device import resolve_precision
from chatforge.errors import ConfigError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train import TrainTask, train
from chatforge.train.optim import MuonAdamW, make_optimizer, muon_param_groups, orthogonalize

FP32 = resolve_precision("fp32", torch.device("cpu"))
VOCAB = ByteTokenizer().vocab_size


def tiny(tie: bool = False, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_embd=32, n_head=2, tie_embeddings=tie,
                         key_smear=True))


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (48, 48)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3.0
    s = torch.linalg.svdvals(orthogonalize(g, dtype=torch.float32))
    # modded-nanogpt's coefficients trade exactness for speed: singular values land in ~[0.7, 1.2]
    assert s.min() > 0.5 and s.max() < 1.3
    assert orthogonalize(g).shape == g.shape


@pytest.mark.parametrize("tie", [False, True])
def test_muon_gets_the_hidden_matrices_and_adamw_the_rest(tie):
    model = tiny(tie)
    groups = muon_param_groups(model, weight_decay=0.1, lr=1e-3, muon_lr=0.02)
    by_kind = {k: {id(p) for g in groups if g["kind"] == k for p in g["params"]} for k in ("muon", "adamw")}
    hidden = {id(b.attn.c_q.weight) for b in model.blocks} | {id(b.mlp.c_fc.weight) for b in model.blocks}
    assert hidden <= by_kind["muon"]
    assert id(model.wte.weight) in by_kind["adamw"] and id(model.output_weight) in by_kind["adamw"]
    assert id(model.blocks[0].attn.key_smear) in by_kind["adamw"]
    assert not by_kind["muon"] & by_kind["adamw"]
    every = {id(p) for p in model.parameters()}
    assert by_kind["muon"] | by_kind["adamw"] == every
    muon = next(g for g in groups if g["kind"] == "muon")
    assert muon["lr_scale"] == pytest.approx(20.0)


def test_the_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = MuonAdamW([{"params": [p1], "kind": "adamw", "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for k in range(5):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(k))
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(1)
    seq = torch.arange(17).repeat(4 * n, 1) + torch.randint(0, 50, (4 * n, 1), generator=g)  # learnable: counting
    return [(seq[i * 4:(i + 1) * 4, :-1], seq[i * 4:(i + 1) * 4, 1:]) for i in range(n)]


def _loss(model, batch):
    x, y = batch
    return model(x, y, loss_reduction="sum")[1], y.numel()


def _cfg(**kw):
    from chatforge.config import TrainConfig

    base = dict(max_steps=30, lr=3e-3, muon_lr=0.02, optimizer="muon", warmup_steps=0, eval_every=0,
                checkpoint_every=0, log_every=1, schedule="constant", dtype="fp32", grad_clip=1.0)
    return TrainConfig(**{**base, **kw})


def _task(model):
    return TrainTask(name="test", model=model, tokenizer=ByteTokenizer(), batches=FixedBatches(_batches()), loss=_loss,
                     tokens_per_micro_batch=64)


def test_muon_trains_in_the_loop_and_beats_its_start(tmp_path):
    model = tiny()
    start = float(torch.log(torch.tensor(float(VOCAB))))  # the untied LM head starts at zero: uniform
    result = train(_task(model), _cfg(), tmp_path, FP32, progress=False)
    assert result.last_train_loss < 0.6 * start


def test_muon_resumes_exactly(tmp_path):
    from chatforge.train.metrics_log import read_metrics

    full = tmp_path / "full"
    train(_task(tiny()), _cfg(max_steps=6, checkpoint_every=3), full, FP32, progress=False)
    part = tmp_path / "part"
    train(_task(tiny()), _cfg(max_steps=3, checkpoint_every=3), part, FP32, progress=False)
    train(_task(tiny()), _cfg(max_steps=6, checkpoint_every=3), part, FP32, resume=True, progress=False)

    def losses(d):
        return [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r.get("kind") == "train"]

    assert losses(part) == losses(full)


def test_optimizer_choice_is_validated():
    with pytest.raises(ConfigError, match="pretrain.optimizer"):
        load_config(overrides=["pretrain.optimizer=lion"])
    with pytest.raises(ConfigError, match="optimizer"):
        make_optimizer(tiny(), "sgd", 1e-3, 0.0, (0.9, 0.95), "cpu")
