"""LoRA adapters, merging for export, freezing specs and trainable-parameter accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from chatforge.errors import ConfigError
from chatforge.model import GPT, ClassifierHead, GPTConfig, GPTWithHead, make_adamw
from chatforge.model.lora import (
    LoRALinear,
    apply_lora,
    format_param_summary,
    freeze,
    merge_lora,
    param_summary,
)


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_embd=32, n_head=2)
    base.update(kw)
    return GPTConfig(**base)


def randomized(cfg: GPTConfig | None = None, seed: int = 0) -> GPT:
    """Every weight random: the real init zeroes output projections and the LM head,
    which would make "outputs unchanged" tests pass trivially."""
    torch.manual_seed(seed)
    model = GPT(cfg or tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def batch(seed: int = 1, B: int = 2, T: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (B, T), generator=g)
    return x, torch.roll(x, -1, dims=1)


def randomize_lora_B(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def step(model: nn.Module, loss_fn) -> None:
    opt = make_adamw(model, weight_decay=0.1, lr=1e-2)
    model.train()
    loss = loss_fn(model)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_loss(model: GPT) -> torch.Tensor:
    x, y = batch()
    return model(x, y)[1]


# --------------------------------------------------------------------------- LoRALinear


def test_lora_with_zero_B_leaves_outputs_unchanged():
    model = randomized()
    x, _ = batch()
    before = model(x)[0]
    names = apply_lora(model, targets=["c_q", "c_v"], r=4, alpha=8)
    assert names == ["blocks.0.attn.c_q", "blocks.0.attn.c_v", "blocks.1.attn.c_q", "blocks.1.attn.c_v"]
    assert isinstance(model.blocks[1].attn.c_v, LoRALinear)
    assert torch.equal(model(x)[0], before)


def test_merge_equals_unmerged_and_unmerge_restores():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=True)
    lora = LoRALinear(base, r=3, alpha=6, dropout=0.0)
    assert lora.scaling == 2.0
    with torch.no_grad():
        lora.lora_B.normal_()
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 8)
    unmerged = lora(x)
    expected = x @ w0.t() + base.bias + 2.0 * (x @ lora.lora_A.t() @ lora.lora_B.t())
    torch.testing.assert_close(unmerged, expected)
    assert not torch.allclose(unmerged, x @ w0.t() + base.bias)  # the update is not zero
    lora.merge()
    lora.merge()  # a second merge must not add the update twice
    torch.testing.assert_close(lora(x), unmerged)
    torch.testing.assert_close(base.weight, w0 + 2.0 * lora.lora_B @ lora.lora_A)
    lora.unmerge()
    torch.testing.assert_close(base.weight, w0)
    torch.testing.assert_close(lora(x), unmerged)


def test_lora_dropout_only_in_training_mode():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 16, bias=False), r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 16)
    lora.eval()
    eval_out = lora(x)
    torch.testing.assert_close(eval_out, x @ (lora.base.weight + lora.delta_weight()).t())
    lora.train()
    assert not torch.allclose(lora(x), eval_out)


def test_lora_gradients_reach_adapters_only():
    model = randomized()
    apply_lora(model, targets=["c_q"], r=2)
    randomize_lora_B(model)
    lm_loss(model).backward()
    q = model.blocks[0].attn.c_q
    assert q.lora_A.grad is not None and q.lora_B.grad is not None
    assert q.base.weight.grad is None and model.wte.weight.grad is None


def test_lora_init_validation():
    with pytest.raises(ConfigError, match="r: must be an integer >= 1"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ConfigError, match="alpha"):
        LoRALinear(nn.Linear(4, 4), alpha=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), dropout=1.0)


# --------------------------------------------------------------------------- apply / merge


def test_merge_lora_then_load_into_plain_gpt_gives_same_logits():
    model = randomized()
    keys = list(model.state_dict())
    apply_lora(model, targets=["c_q", "c_k", "c_v", "c_proj", "c_fc"], r=4, alpha=16)
    assert "blocks.0.attn.c_q.lora_A" in model.state_dict()
    randomize_lora_B(model)
    x, _ = batch()
    with_lora = model(x)[0]
    merged = merge_lora(model)
    assert len(merged) == 2 * 6  # c_proj names both the attention and the MLP output: 6 layers per block
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    state = model.state_dict()
    assert list(state) == keys
    plain = GPT(tiny_config()).eval()
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x)[0], with_lora, rtol=1e-4, atol=1e-4)
    assert merge_lora(model) == []


def test_frozen_parameters_do_not_change_after_a_step():
    model = randomized()
    apply_lora(model, targets=["c_q", "c_v"], r=4)
    randomize_lora_B(model)
    before = snapshot(model)
    step(model, lm_loss)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if ".lora_" in k}
    assert changed == lora_keys and len(lora_keys) == 8


def test_trainable_counts_and_extra_trainable_head():
    model = randomized()
    total = param_summary(model)["total"]
    apply_lora(model, targets=["c_q", "c_v"], r=8, alpha=16)
    # 2 layers x 2 targets x r * (in + out) = 4 * 8 * (32 + 32)
    s = param_summary(model)
    assert s == {"trainable": 2048, "total": total + 2048, "fraction": 2048 / (total + 2048)}
    assert format_param_summary(s) == f"trainable params: 2,048 / {total + 2048:,} ({100 * 2048 / (total + 2048):.2f}%)"

    torch.manual_seed(0)
    clf = GPTWithHead(GPT(tiny_config()), ClassifierHead(32, 3))
    apply_lora(clf, targets=["c_q", "c_v"], r=8, trainable=["head"])
    assert param_summary(clf)["trainable"] == 2048 + 32 * 3 + 3
    assert all(p.requires_grad for p in clf.head.parameters())
    assert not clf.backbone.wte.weight.requires_grad


def test_classifier_lora_step_trains_head_and_adapters_only():
    torch.manual_seed(0)
    clf = GPTWithHead(randomized(), ClassifierHead(32, 3))
    apply_lora(clf, targets=["c_v"], r=2, trainable=["head"])
    before = snapshot(clf)
    x, _ = batch()
    labels = torch.tensor([0, 2])
    step(clf, lambda m: nn.functional.cross_entropy(m(x), labels))
    after = snapshot(clf)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"head.proj.weight", "head.proj.bias"} <= changed
    assert all(k.startswith("head.") or ".lora_" in k for k in changed)


def test_apply_lora_errors():
    model = randomized()
    with pytest.raises(ConfigError, match=r"\['c_qq'\] match no nn.Linear.*c_fc, c_k, c_proj, c_q, c_v"):
        apply_lora(model, targets=["c_q", "c_qq"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    with pytest.raises(ConfigError, match="reads lm_head.weight directly"):
        apply_lora(model, targets=["lm_head"])
    with pytest.raises(ConfigError, match="'head' is not a submodule of GPT"):
        apply_lora(model, targets=["c_q"], trainable=["head"])
    apply_lora(model, targets=["c_q"])
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(model, targets=["c_v"])
    with pytest.raises(ConfigError, match="LoRA layers"):
        freeze(model, "embeddings")


# --------------------------------------------------------------------------- freezing


def trainable_names(model: nn.Module) -> set[str]:
    return {k for k, p in model.named_parameters() if p.requires_grad}


def test_freeze_specs_plain_gpt():
    model = randomized()
    all_names = {k for k, _ in model.named_parameters()}
    assert freeze(model, "none") == [] and trainable_names(model) == all_names
    assert freeze(model, "embeddings") == ["wte.weight"]
    assert trainable_names(model) == all_names - {"wte.weight"}
    frozen = freeze(model, "blocks:1")
    assert set(frozen) == {"wte.weight"} | {k for k in all_names if k.startswith("blocks.0.")}
    assert trainable_names(model) == {k for k in all_names if k.startswith(("blocks.1.", "lm_head."))}
    freeze(model, "blocks:2")
    assert trainable_names(model) == {"lm_head.weight"}
    freeze(model, "backbone")
    assert trainable_names(model) == {"lm_head.weight"}
    freeze(model, "none")  # the spec alone decides: earlier freezing is undone
    assert trainable_names(model) == all_names


def test_freeze_backbone_of_classifier_and_step():
    torch.manual_seed(0)
    clf = GPTWithHead(randomized(), ClassifierHead(32, 3))
    freeze(clf, "backbone")
    assert trainable_names(clf) == {"head.proj.weight", "head.proj.bias"}
    s = param_summary(clf)
    assert s["trainable"] == 32 * 3 + 3 and s["total"] == clf.backbone.num_params() + 99

    freeze(clf, "blocks:1")
    before = snapshot(clf)
    x, _ = batch()
    step(clf, lambda m: nn.functional.cross_entropy(m(x), torch.tensor([1, 2])))
    after = snapshot(clf)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("backbone.wte.", "backbone.blocks.0.")) for k in changed)
    assert any(k.startswith("backbone.blocks.1.") for k in changed) and "head.proj.weight" in changed


@pytest.mark.parametrize("spec", ["all", "blocks:", "blocks:x", "blocks:3", "blocks:-1", "Backbone"])
def test_freeze_spec_errors(spec):
    with pytest.raises(ConfigError, match=r"allowed: none, embeddings, blocks:N, backbone \(N = 0..2\)"):
        freeze(randomized(), spec)


def test_freeze_backbone_of_tied_gpt_is_an_error():
    with pytest.raises(ConfigError, match="tie_embeddings=True"):
        freeze(GPT(tiny_config(tie_embeddings=True)), "backbone")
    with pytest.raises(ConfigError, match="expected a GPT or a GPTWithHead"):
        freeze(nn.Linear(2, 2), "none")
