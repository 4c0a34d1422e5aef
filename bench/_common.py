"""Shared pieces of the model benchmarks: model-shape flags, thread setup, timing, tables.

Bench scripts run as ``python bench/NAME.py``, so this file is imported as ``_common``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chatforge.model import GPTConfig


@dataclass
class Shape:
    """Defaults of one benchmark: the representative size and the --quick smoke-test size."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    batch_size: int


def add_shape_args(ap: argparse.ArgumentParser, default: Shape, with_batch: bool = True) -> None:
    """Flags shared by the model benchmarks; None means "the default (or --quick) value"."""
    g = ap.add_argument_group("model shape (defaults: " + ", ".join(f"{k}={v}" for k, v in vars(default).items())
                              + ")")
    g.add_argument("--depth", type=int, default=None,
                   help="nanochat-style size knob (GPTConfig.from_depth); --n-layer/--n-embd/--n-head override it")
    g.add_argument("--n-layer", type=int, default=None)
    g.add_argument("--n-embd", type=int, default=None)
    g.add_argument("--n-head", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None, help="context length (GPT-2's n_positions)")
    g.add_argument("--vocab-size", type=int, default=None)
    if with_batch:
        g.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = one per core)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test, not a measurement")


def resolve_shape(args: argparse.Namespace, default: Shape, quick: Shape) -> tuple[GPTConfig, int]:
    """(model config, batch size) from the flags; explicit flags win over --quick and the defaults."""
    base = quick if args.quick else default
    vocab = args.vocab_size or base.vocab_size
    block = args.block_size or base.block_size
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head") if getattr(args, k) is not None}
    if args.depth is not None:
        config = GPTConfig.from_depth(args.depth, vocab_size=vocab, block_size=block, **overrides)
    else:
        shape = {"n_layer": base.n_layer, "n_embd": base.n_embd, "n_head": base.n_head, **overrides}
        config = GPTConfig(vocab_size=vocab, block_size=block, **shape)
    return config, getattr(args, "batch_size", None) or base.batch_size


def setup_threads(threads: int) -> int:
    """Fix the intra-op thread count so every model runs under the same setting; returns it."""
    n = threads if threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def machine_line(threads: int) -> str:
    """One line describing where the numbers come from (CPU model, bf16 hardware support)."""
    from chatforge.device import cpu_flags

    cpu, flags = platform.processor() or platform.machine(), cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"cpu: {cpu}; cores: {os.cpu_count()}; torch threads: {threads}; torch {torch.__version__}; "
            f"bf16 hardware: {', '.join(bf16) if bf16 else 'none found (bf16 is emulated: slow)'}")


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def count_params(model: torch.nn.Module) -> int:
    """Parameters, each shared (tied) tensor once."""
    return sum(p.numel() for p in model.parameters())
