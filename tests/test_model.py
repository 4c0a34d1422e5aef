"""The GPT: shapes, causality, masks, loss, GQA, tying, config rules, optimizer groups, heads, learning."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model import (
    GPT,
    ClassifierHead,
    GPTConfig,
    GPTWithHead,
    ScalarHead,
    estimate_mfu,
    flops_per_token,
    param_groups,
)
from chatforge.model.heads import last_token_index

V = 48


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_embd=32, n_head=4)
    base.update(kw)
    return GPTConfig(**base)


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model whose every weight is random (the real init zeroes output projections,
    which would make many outputs trivially equal and the tests unable to fail)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- forward


def test_shapes_and_return_hidden():
    model = randomized(tiny_config())
    x = tokens(3, 10)
    logits, loss = model(x)
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float32 and loss is None
    logits2, loss2, hidden = model(x, targets=x, return_hidden=True)
    assert hidden.shape == (3, 10, 32)
    assert loss2.ndim == 0 and torch.isfinite(loss2)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(model.forward_hidden(x), hidden)
    # The final norm: every hidden vector has unit RMS.
    torch.testing.assert_close(hidden.pow(2).mean(-1), torch.ones(3, 10), atol=1e-4, rtol=0)


def test_fresh_init_predicts_uniform():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    x = tokens(2, 8)
    _, loss = model(x, targets=x)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(float(V))).item(), abs=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"tie_embeddings": True}, {"key_smear": True}])
def test_causality_future_tokens_do_not_change_past(kw):
    model = randomized(tiny_config(**kw))
    x = tokens(2, 12)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 5) % V
    lx, _ = model(x)
    ly, _ = model(y)
    torch.testing.assert_close(lx[:, :7], ly[:, :7])
    assert not torch.allclose(lx[:, 7:], ly[:, 7:])


def test_block_size_guard_names_both_numbers():
    model = randomized(tiny_config(block_size=8))
    with pytest.raises(ChatforgeError, match=r"9 tokens.*block_size=8"):
        model(tokens(1, 9))


def test_gqa_matches_explicitly_repeated_kv_heads():
    """n_kv_head=2 < n_head=4 equals a plain multi-head model whose k/v projections
    repeat each kv head for its group of query heads."""
    gqa = randomized(tiny_config(n_kv_head=2))
    mha = GPT(tiny_config())
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if ".c_k." not in k and ".c_v." not in k},
                        strict=False)
    hd = 8
    with torch.no_grad():
        for bg, bm in zip(gqa.blocks, mha.blocks):
            for name in ("c_k", "c_v"):
                w = getattr(bg.attn, name).weight.view(2, hd, 32)  # (kv_head, hd, C)
                getattr(bm.attn, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * hd, 32))
    assert gqa.blocks[0].attn.c_k.weight.shape == (16, 32)
    x = tokens(2, 9)
    torch.testing.assert_close(gqa(x)[0], mha.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_are_saved_once():
    model = GPT(tiny_config(tie_embeddings=True))
    assert model.lm_head is None
    assert model.output_weight.data_ptr() == model.wte.weight.data_ptr()
    assert [k for k in model.state_dict() if "wte" in k or "lm_head" in k] == ["wte.weight"]
    untied = GPT(tiny_config())
    assert untied.num_params() - model.num_params() == V * 32
    # Gradient arrives from both uses: input lookup and output projection.
    x = tokens(2, 6)
    model(x, targets=x)[1].backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("key_smear", [False, True])
def test_doc_ids_keep_attention_inside_each_document(key_smear):
    model = randomized(tiny_config(key_smear=key_smear))
    doc1, doc2 = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = torch.cat([doc1, doc2], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    packed_logits, _ = model(packed, doc_ids=doc_ids)
    alone1, _ = model(doc1)
    alone2, _ = model(doc2)
    torch.testing.assert_close(packed_logits[:, :5], alone1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_logits[:, 5:], alone2, atol=1e-5, rtol=1e-5)
    # Without the mask doc 2 sees doc 1 and its logits differ.
    assert not torch.allclose(model(packed)[0][:, 5:], alone2, atol=1e-3)


def test_explicit_block_diagonal_attn_mask_equals_doc_ids_mask():
    model = randomized(tiny_config())
    x = tokens(2, 8)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2, 2]])
    block = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    with_doc_ids, _ = model(x, doc_ids=doc_ids)
    # RoPE is relative, so even without the position restart the logits agree.
    with_mask, _ = model(x, attn_mask=block)
    torch.testing.assert_close(with_mask, with_doc_ids, atol=1e-5, rtol=1e-5)
    with pytest.raises(ChatforgeError, match="attn_mask must be bool"):
        model(x, attn_mask=block.float())


@pytest.mark.parametrize("key_smear", [False, True])
def test_padding_mask_left_padded_row_equals_row_alone(key_smear):
    model = randomized(tiny_config(key_smear=key_smear))
    row = tokens(1, 6, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out, _ = model(padded, padding_mask=mask)
    assert torch.isfinite(out).all()  # pad queries attend to themselves, never an empty row
    torch.testing.assert_close(out[:, 3:], model(row)[0], atol=1e-5, rtol=1e-5)


def test_smeared_keys_start_half_mixed_and_read_the_previous_token():
    torch.manual_seed(0)
    fresh = GPT(tiny_config(key_smear=True))
    assert all(float(b.attn.key_smear.detach().abs().max()) == 0.0 for b in fresh.blocks)  # sigmoid(0) = 1/2
    plain = randomized(tiny_config())
    smeared = GPT(tiny_config(key_smear=True))
    missing = smeared.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"blocks.{i}.attn.key_smear" for i in range(2)]
    smeared.eval()
    x = tokens(2, 10)
    with torch.no_grad():
        for b in smeared.blocks:
            b.attn.key_smear.fill_(30.0)  # a = 1: own keys only, the plain model
        torch.testing.assert_close(smeared(x)[0], plain(x)[0])
        for b in smeared.blocks:
            b.attn.key_smear.fill_(-30.0)  # a = 0: the previous token's key
        out = smeared(x)[0]
    assert not torch.allclose(out, plain(x)[0], atol=1e-3)
    torch.testing.assert_close(out[:, 0], plain(x)[0][:, 0])  # the first token has no predecessor: its own key


def test_loss_ignores_minus_one_targets_and_masked_positions():
    model = randomized(tiny_config())
    x = tokens(2, 8)
    targets = tokens(2, 8, seed=5)
    logits, _ = model(x)
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
                                                  reduction="none").view(2, 8)
    t_ignored = targets.clone()
    t_ignored[0, :3] = -1
    loss_mask = torch.ones(2, 8, dtype=torch.bool)
    loss_mask[1, 5:] = False
    keep = (t_ignored != -1) & loss_mask
    _, loss = model(x, targets=t_ignored, loss_mask=loss_mask)
    torch.testing.assert_close(loss, per_token[keep].mean())
    _, summed = model(x, targets=t_ignored, loss_mask=loss_mask, loss_reduction="sum")
    torch.testing.assert_close(summed, per_token[keep].sum())
    _, none = model(x, targets=t_ignored, loss_mask=loss_mask, loss_reduction="none")
    assert none.shape == (2, 8) and (none[~keep] == 0).all()
    # Nothing counts: 0, not NaN, and still differentiable.
    _, empty = model(x, targets=torch.full_like(x, -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_bf16_autocast_on_cpu_matches_fp32():
    model = randomized(tiny_config(n_kv_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # keep logits in a range where bf16's 3 digits are meaningful
    x = tokens(2, 16)
    fp32_logits, fp32_loss = model(x, targets=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits, bf16_loss = model(x, targets=x)
    assert bf16_logits.dtype == torch.float32  # logits are upcast before the loss
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.03 * fp32_loss.item()
    assert (bf16_logits - fp32_logits).abs().mean() < 0.05 * fp32_logits.abs().mean()


# --------------------------------------------------------------------------- config


def test_from_depth_rule_and_overrides():
    c12 = GPTConfig.from_depth(12, vocab_size=50304, block_size=1024)
    assert (c12.n_layer, c12.n_embd, c12.n_head, c12.n_kv_head, c12.head_dim) == (12, 768, 12, 12, 64)
    c20 = GPTConfig.from_depth(20, vocab_size=65536, block_size=2048)
    assert (c20.n_embd, c20.n_head) == (1280, 20)
    c1 = GPTConfig.from_depth(1, vocab_size=100, block_size=16)
    assert (c1.n_embd, c1.n_head) == (64, 1)
    small = GPTConfig.from_depth(2, vocab_size=V, block_size=32, n_embd=48)
    assert (small.n_layer, small.n_embd, small.n_head) == (2, 48, 1)
    wide = GPTConfig.from_depth(4, vocab_size=V, block_size=32, n_embd=320)  # 320/5 = 64
    assert wide.n_head == 5
    odd = GPTConfig.from_depth(4, vocab_size=V, block_size=32, n_embd=390)  # 390/6 = 65 is odd -> 5 heads of 78
    assert odd.n_head == 5 and odd.head_dim % 2 == 0
    gqa = GPTConfig.from_depth(4, vocab_size=V, block_size=32, n_head=8, n_kv_head=2, tie_embeddings=True)
    assert (gqa.n_embd, gqa.n_head, gqa.n_kv_head, gqa.tie_embeddings) == (256, 8, 2, True)
    with pytest.raises(ConfigError, match="n_heads"):
        GPTConfig.from_depth(4, vocab_size=V, block_size=32, n_heads=3)
    with pytest.raises(ConfigError, match="depth"):
        GPTConfig.from_depth(0, vocab_size=V, block_size=32)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="n_kv_head"):
        tiny_config(n_kv_head=3)
    with pytest.raises(ConfigError, match="n_embd"):
        tiny_config(n_embd=30)
    with pytest.raises(ConfigError, match="block_size"):
        tiny_config(block_size="32")
    assert tiny_config().n_kv_head == 4


def test_config_json_round_trip_and_unknown_key():
    cfg = tiny_config(n_kv_head=2, tie_embeddings=True, logit_softcap=15.0)
    again = GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match=r"ckpt/config.json: unknown model config key 'n_heads'"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_heads": 4}, source="ckpt/config.json")
    with pytest.raises(ConfigError, match=r"ckpt/config.json: GPTConfig.dropout"):
        GPTConfig.from_dict({**cfg.to_dict(), "dropout": 2.0}, source="ckpt/config.json")


# --------------------------------------------------------------------------- counting, optimizer


@pytest.mark.parametrize("tie", [False, True])
def test_param_and_flop_counts(tie):
    cfg = tiny_config(n_kv_head=2, tie_embeddings=tie)
    model = GPT(cfg)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 2 * 32 * 128  # q, proj; k, v (2 kv heads of 8); mlp
    embed = V * 32
    assert model.num_params() == 2 * per_layer + embed + (0 if tie else embed)
    assert model.num_params(exclude_embeddings=True) == 2 * per_layer + (0 if tie else embed)
    # 6 FLOPs per multiplied weight (the LM head matmul even when tied) + PaLM's attention term.
    expected = 6 * (2 * per_layer + embed) + 12 * 2 * 4 * 8 * 32
    assert model.flops_per_token() == flops_per_token(cfg) == expected
    assert model.flops_per_token(seq_len=16) == expected - 12 * 2 * 4 * 8 * 16
    assert model.estimate_mfu(1000.0, expected * 4000.0) == pytest.approx(0.25)
    assert estimate_mfu(10.0, 5.0, 100.0) == pytest.approx(0.5)


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_split_matmuls_from_embeddings_and_biases(tie):
    model = GPT(tiny_config(tie_embeddings=tie))
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert no_decay_ids == {id(model.wte.weight)}
    matmuls = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert decay_ids == matmuls and len(matmuls) == 2 * 6 + (0 if tie else 1)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # With a head: its bias is not decayed, its weight is; frozen backbone params are left out.
    wrapped = GPTWithHead(model, ClassifierHead(32, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    head_groups = {g["name"]: g["params"] for g in param_groups(wrapped, 0.1)}
    assert [p.shape for p in head_groups["decay"]] == [(3, 32)]
    assert [p.shape for p in head_groups["no_decay"]] == [(3,)]


def test_model_learns_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=V))
    x = tokens(4, 17, seed=9)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = model.configure_optimizer(weight_decay=0.0, lr=1e-2)
    losses = []
    for _ in range(50):
        _, loss = model(inputs, targets=targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(3.871, abs=0.01)  # ln 48: uniform start
    assert losses[-1] < 0.25 * losses[0], losses[::10]


# --------------------------------------------------------------------------- heads


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    with pytest.raises(ChatforgeError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_scalar_head_shapes_and_last_token_pooling():
    backbone = randomized(tiny_config())
    reward = GPTWithHead(backbone, ScalarHead(32, reduce="last"))
    with torch.no_grad():
        reward.head.proj.weight.normal_()
    x = tokens(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0  # right padding: real tokens 0..3
    out = reward(x, attention_mask=mask)
    assert out.shape == (2,) and out.dtype == torch.float32
    hidden = backbone.forward_hidden(x[:1, :4])
    torch.testing.assert_close(out[0], reward.head.proj(hidden[0, 3]).squeeze(), atol=1e-5, rtol=1e-5)
    # The padded positions' content does not matter.
    x2 = x.clone()
    x2[0, 4:] = (x2[0, 4:] + 1) % V
    torch.testing.assert_close(reward(x2, attention_mask=mask), out)
    value = GPTWithHead(backbone, ScalarHead(32, reduce="none"))
    assert value(x).shape == (2, 7)
    assert (GPTWithHead(backbone, ScalarHead(32))(x) == 0).all()  # zero init: neutral reward


def test_classifier_head_pooling_shapes_and_left_padding():
    backbone = randomized(tiny_config())
    for pooling in ("last", "mean"):
        clf = GPTWithHead(backbone, ClassifierHead(32, n_classes=3, pooling=pooling))
        with torch.no_grad():
            clf.head.proj.weight.normal_()
        row = tokens(1, 5, seed=6)
        padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], dim=1)
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
        out = clf(padded, attention_mask=mask)
        assert out.shape == (1, 3)
        torch.testing.assert_close(out, clf(row), atol=1e-5, rtol=1e-5)
    with pytest.raises(ChatforgeError, match="pooling"):
        ClassifierHead(32, 3, pooling="max")
    fresh = GPTWithHead(backbone, ClassifierHead(32, 4))
    assert torch.allclose(fresh(tokens(2, 5)).softmax(-1), torch.full((2, 4), 0.25))
