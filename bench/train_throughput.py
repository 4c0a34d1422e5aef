"""Training throughput: chatforge's GPT against Hugging Face ``GPT2LMHeadModel`` of the same shape.

    python bench/train_throughput.py            # 4 layers x 256 wide, block 256, batch 8 (~2-4 min on 2 cores)
    python bench/train_throughput.py --quick    # smoke test
    python bench/train_throughput.py --depth 6 --block-size 512 --threads 2

One training step = forward + cross-entropy + backward + AdamW step + zero_grad, a
plain loop, on the same fixed random batch for both models, in fp32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Both optimisers are the same torch
AdamW (chatforge's ``make_adamw`` parameter groups: decay on matmul weights only).
After untimed warmup steps, each (model, dtype) runs ``--steps`` timed steps per
round; rounds are interleaved across models and the best round counts, which is the
one least disturbed by other work on the machine.

Same SHAPE, not same ARCHITECTURE: chatforge uses RoPE, parameter-free RMSNorm,
QK-norm, a ReLU^2 MLP and no biases; GPT-2 has a learned position table, LayerNorm
with gains and biases, GELU, and biases everywhere. Both have n_layer blocks of
n_head heads, an MLP 4x wide, and the same (by default untied) embedding and LM
head, so the matmul FLOPs match and the parameter counts differ only by GPT-2's
position table, norms and biases (both are printed).
Ends with ``ratio train_fp32: X`` and ``ratio train_bf16: X``: chatforge tokens/s
divided by GPT-2 tokens/s (higher = chatforge faster).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import (
    Shape,
    add_shape_args,
    count_params,
    machine_line,
    print_table,
    resolve_shape,
    setup_threads,
)

from chatforge.model import GPT, GPTConfig, make_adamw

DEFAULT = Shape(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab_size=4096, batch_size=8)
QUICK = Shape(n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=512, batch_size=2)
DTYPES = ("fp32", "bf16")


def hf_gpt2(config: GPTConfig) -> torch.nn.Module:
    """GPT2LMHeadModel with chatforge's shape, no dropout, SDPA attention, same embedding tying."""
    import transformers

    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.mlp_hidden,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        tie_word_embeddings=config.tie_embeddings, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(hf_config)


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def make_step(name: str, model: torch.nn.Module, dtype: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """A closure running one full training step; returns the loss (a sync point: the step is done)."""
    opt = make_adamw(model, weight_decay=0.1, lr=3e-4)
    vocab = model.config.vocab_size

    def chatforge_loss() -> torch.Tensor:
        _, loss = model(x, targets=y)
        return loss

    def hf_loss() -> torch.Tensor:
        # The plain loop a user writes: logits for all T positions, cross-entropy against the
        # shifted targets (HF's labels= would drop one position, so the work would differ).
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))

    compute_loss = chatforge_loss if name == "chatforge" else hf_loss

    def step() -> float:
        with autocast(dtype):
            loss = compute_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, DEFAULT)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5, --quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, best counts (default 3, --quick 1)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model and dtype")
    ap.add_argument("--tie", action="store_true", help="tie embedding and LM head in both models")
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    if steps < 1 or rounds < 1 or args.warmup < 0:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    try:
        import transformers
    except ImportError:
        sys.exit("this benchmark needs Hugging Face transformers: pip install transformers")

    threads = setup_threads(args.threads)
    config, batch = resolve_shape(args, DEFAULT, QUICK)
    if args.tie:
        config.tie_embeddings = True
    print(machine_line(threads))
    print(f"transformers {transformers.__version__}; shape: n_layer={config.n_layer} n_embd={config.n_embd} "
          f"n_head={config.n_head} block={config.block_size} vocab={config.vocab_size} batch={batch} "
          f"tied={config.tie_embeddings}; {args.warmup} warmup + {rounds} rounds x {steps} timed steps")
    print("note: same shape, not same architecture (chatforge: RoPE, RMSNorm, QK-norm, ReLU^2, no bias; "
          "GPT-2: learned positions, LayerNorm, GELU, biases)")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), generator=gen)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    models = {"chatforge": GPT(config), "hf-gpt2": hf_gpt2(config)}
    for m in models.values():
        m.train()
    params = {name: count_params(m) for name, m in models.items()}

    # One model instance per (impl, dtype): each dtype starts from the same fresh weights
    # and its own optimizer state, so the order of the runs does not matter.
    runs: dict[tuple[str, str], Callable[[], float]] = {}
    initial = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    for dtype in DTYPES:
        for name in models:
            fresh = GPT(config) if name == "chatforge" else hf_gpt2(config)
            fresh.load_state_dict(initial[name])
            runs[(name, dtype)] = make_step(name, fresh.train(), dtype, x, y)
    del models

    for key, step in runs.items():
        for _ in range(args.warmup):
            step()
        print(f"warmed up {key[0]} {key[1]}", flush=True)
    best = {key: float("inf") for key in runs}
    losses: dict[tuple[str, str], float] = {}
    for r in range(rounds):
        for key, step in runs.items():  # interleaved: drift on the machine hits every run alike
            t0 = time.perf_counter()
            for _ in range(steps):
                losses[key] = step()
            best[key] = min(best[key], (time.perf_counter() - t0) / steps)
        print(f"round {r + 1}/{rounds} done", flush=True)

    tokens = batch * config.block_size
    rows = []
    for (name, dtype), sec in best.items():
        rows.append([name, dtype, f"{params[name] / 1e6:.2f}M", f"{tokens / sec:,.0f}", f"{sec * 1e3:.1f}",
                     f"{losses[(name, dtype)]:.3f}"])
    print()
    print_table(["model", "dtype", "params", "tokens/s", "ms/step", "last loss"], rows)
    print()
    for dtype in DTYPES:
        ratio = best[("hf-gpt2", dtype)] / best[("chatforge", dtype)]  # = chatforge tok/s / HF tok/s
        print(f"ratio train_{dtype}: {ratio:.3f}")


if __name__ == "__main__":
    main()
