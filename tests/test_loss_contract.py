"""The loss contract: sums and counts make an optimizer step's gradient independent of how the
step's examples are grouped (accumulation steps, data-parallel ranks), even when micro-batches
hold different numbers of learned tokens, as chat SFT's always do."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from chatforge.chat.batching import ChatBatches, chat_loss
from chatforge.chat.template import render
from chatforge.device import resolve_precision
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.dist import DistInfo
from chatforge.train.loop import LossOutput, accumulate_gradients, as_loss_output

TOK = ByteTokenizer()
FP32 = resolve_precision("fp32", torch.device("cpu"))
BLOCK = 64


def examples():
    """Conversations whose replies differ a lot in length: rows of 2..40 learned tokens."""
    out = []
    for k in range(16):
        reply = "ok" if k % 3 == 0 else "your parcel " * (1 + k % 4)
        out.append(render([{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": reply}], TOK))
    return out


def model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=BLOCK, n_layer=2, n_embd=32, n_head=2))
    with torch.no_grad():  # the zero-initialised projections would give many exactly-zero gradients
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def step_grads(batch_size: int, accum: int, rank: int = 0, world: int = 1, ddp: bool = False
               ) -> dict[str, torch.Tensor]:
    m = model()
    batches = ChatBatches(examples(), BLOCK, batch_size, seed=3, pack=False, pad_id=TOK.pad_id, rank=rank,
                          world_size=world)
    micro = [next(batches) for _ in range(accum)]
    wrapped = torch.nn.parallel.DistributedDataParallel(m) if ddp else m
    accumulate_gradients(wrapped, chat_loss, micro, FP32, DistInfo(rank, rank, world), list(m.parameters()))
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    for name in a:
        diff = float((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12))
        assert diff < rel, f"{name}: relative difference {diff:.2e}"


def test_rows_really_hold_different_numbers_of_learned_tokens():
    rows = next(ChatBatches(examples(), BLOCK, 8, seed=3, pack=False, pad_id=TOK.pad_id))["loss_mask"].sum(1)
    assert int(rows.min()) * 3 < int(rows.max()), rows


def test_accumulation_1x8_2x4_4x2_give_the_same_gradient():
    one = step_grads(8, 1)
    assert_same(one, step_grads(4, 2))
    assert_same(one, step_grads(2, 4))


def test_a_mean_of_micro_batch_means_would_not():
    """What the loop did before: each micro-batch's mean, averaged. It weights a token of a short
    row more than one of a long row, so its gradient differs from the big batch's (this is why the
    test above can fail)."""
    m = model()
    batches = ChatBatches(examples(), BLOCK, 2, seed=3, pack=False, pad_id=TOK.pad_id)
    for _ in range(4):
        total, count = chat_loss(m, next(batches))
        (total / count / 4).backward()
    naive = {n: p.grad.clone() for n, p in m.named_parameters()}
    with pytest.raises(AssertionError, match="relative difference"):
        assert_same(step_grads(8, 1), naive, rel=1e-3)


def _rank(rank: int, store: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        grads = step_grads(4, 1, rank=rank, world=2, ddp=True)  # 2 ranks x 4 rows = the big batch of 8
        if rank == 0:
            torch.save(grads, out)
    finally:
        torch_dist.destroy_process_group()


def test_two_gloo_ranks_give_the_gradient_of_one_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn")
    assert_same(step_grads(8, 1), torch.load(out))


def test_a_loss_must_return_sums_and_counts():
    assert as_loss_output((torch.tensor(2.0), 4), "t").count == 4
    out = as_loss_output(LossOutput(torch.tensor(1.0), 2, {"acc": (1, 2)}), "t")
    assert out.metrics == {"acc": (1, 2)}
    with pytest.raises(Exception, match=r"t: the loss must return \(sum, count\)"):
        as_loss_output(torch.tensor(0.5), "t")
