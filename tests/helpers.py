"""Shared test helpers: a tiny run directory as the data path leaves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatforge.config import ShardConfig
from chatforge.data.shard import shard_corpus
from chatforge.io import write_jsonl
from chatforge.tokenizer.byte import ByteTokenizer

WORDS = ("order", "shipping", "refund", "parcel", "return", "warranty", "account", "delivery", "the", "a", "your",
         "we", "is", "was", "will", "today", "tomorrow", "please", "thanks", "help")


def make_run(runs: Path, name: str, n_docs: int = 300) -> Path:
    """``runs/name`` with clean text, a byte tokenizer and train/val shards."""
    run = runs / name
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(n_docs):
        idx = torch.randint(0, len(WORDS), (40,), generator=g).tolist()
        docs.append({"id": f"d{i}", "text": " ".join(WORDS[j] for j in idx) + ".", "source": "test"})
    write_jsonl(run / "data" / "clean.jsonl", docs)
    tok = ByteTokenizer()
    tok.save(run / "tokenizer")
    shard_corpus(run / "data" / "clean.jsonl", tok, run / "data", ShardConfig(val_fraction=0.1))
    return run


TINY_PRETRAIN = ["model.depth=2", "model.n_embd=32", "model.n_head=2", "model.block_size=96", "pretrain.batch_size=4",
                 "pretrain.max_steps=10", "pretrain.eval_every=0", "pretrain.dtype=fp32", "pretrain.checkpoint_every=0"]


def pretrained_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """``tmp_path/runs/r`` with a tiny model pre-trained 10 steps (the base of the alignment stages' tests):
    the runs directory and the config overrides that name it."""
    import json

    from chatforge.config import load_config
    from chatforge.train.pretrain import pretrain

    runs = tmp_path / "runs"
    make_run(runs, "r")
    base = [*TINY_PRETRAIN, f"runs_dir={json.dumps(str(runs))}", "name=r"]
    pretrain(load_config(overrides=base), progress=False)
    return runs, base


def tiny_byte_gpt(seed: int = 0):
    """A seeded 2-layer GPT over the byte tokenizer (the on-policy stages' unit tests)."""
    from chatforge.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=ByteTokenizer().vocab_size, block_size=64))


def byte_prompt_items(n: int = 4) -> list:
    """``n`` one-turn prompts ``q0``, ``q1``, ... rendered for the byte tokenizer, as rollouts take them."""
    from chatforge.align.rollout import PromptItem
    from chatforge.chat.template import render

    tok = ByteTokenizer()
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"q{i}"}]
        out.append(PromptItem(f"t:{i}", msgs, render(msgs, tok, add_generation_prompt=True).ids, {"i": i}))
    return out


class FixedBatches:
    """A resumable iterator over a fixed list of (x, y) batches, cycling."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def random_gpt(seed: int = 0, **config: Any) -> Any:
    """A GPT (in eval mode) with random weights everywhere: the real init zeroes the LM head and the output
    projections, which would make every logit equal. ``config``: GPTConfig fields."""
    from chatforge.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()
