"""Memory of data loading and evaluation as the corpus grows: peak RSS at 1x and 10x.

    python bench/data_memory.py                  # 1x = 500k train + 500k held-out tokens, and 10x that
    python bench/data_memory.py --tokens 2000000 # larger (the eval job then takes minutes on 2 cores)

Writes random token shards in ``chatforge data shard``'s format (train shards of
``--shard-tokens`` each, one ``val.bin`` as that command writes it), then, in a fresh
process per corpus size and job (peak RSS only ever grows within a process):

- ``load``: the training ``TokenLoader`` reading one whole epoch of the train shards;
- ``eval``: the pre-training stage's held-out evaluation over the whole ``val.bin``
  (``iter_eval_blocks`` + ``evaluate_lm`` with a tiny GPT);
- ``baseline``: its unigram baseline (``eval.lm.unigram_baseline``, train and val shards);
- ``prompts``: its sample prompts (``train.pretrain.sample_prompts``, val shard).

Each prints peak RSS (``VmHWM``) and the peaks of its two parts, sampled every few ms:
anonymous memory (``RssAnon``: the process's own arrays) and file pages mapped into the
process (``RssFile``: shard pages read through a memory map, which the kernel may drop at
any time). Memory is flat when the 10x figures equal the 1x ones. Ends with one
``ratio peak_rss JOB: VALUE`` line per job (10x / 1x, 1.0 = flat).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

VOCAB = 512
BOS = 0
BLOCK = 256
BATCH = 16
JOBS = ("load", "eval", "baseline", "prompts")


def _status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


class PeakSampler:
    """Peaks of RssAnon and RssFile, sampled in a thread (VmHWM only knows the total)."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak = every_s, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(self.every_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        s = _status()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s.get(k, 0))


def write_corpus(root: Path, tokens: int, shard_tokens: int, seed: int) -> Path:
    """Random train shards and one val.bin of ``tokens`` tokens each, with a shards.json."""
    from chatforge.data.shard import write_shard

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def tokens_of(n: int) -> np.ndarray:
        t = rng.integers(1, VOCAB, size=n, dtype=np.uint16)
        t[rng.random(n) < 1 / 200] = BOS  # documents of ~200 tokens
        t[0] = BOS
        return t

    names = []
    for i, start in enumerate(range(0, tokens, shard_tokens)):
        name = f"train_{i:04d}.bin"
        write_shard(root / name, tokens_of(min(shard_tokens, tokens - start)), VOCAB, BOS)
        names.append(name)
    write_shard(root / "val.bin", tokens_of(tokens), VOCAB, BOS)
    return root


def child(job: str, data: Path) -> dict[str, object]:
    """Run one job in this (fresh) process and return its memory figures."""
    import torch

    from chatforge.data.loader import TokenLoader, iter_eval_blocks
    from chatforge.eval.lm import evaluate_lm, unigram_baseline
    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.train.pretrain import sample_prompts

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    train = sorted(data.glob("train_*.bin"))
    val = [data / "val.bin"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_embd=32, n_head=2)).eval()
    token_bytes = torch.ones(VOCAB, dtype=torch.long)
    before = _status()
    t0 = time.perf_counter()
    with PeakSampler() as peaks:
        if job == "load":
            loader = TokenLoader(train, BLOCK, BATCH, seed=0)
            n = -(-loader.n_windows // BATCH)
            checksum = 0
            for _ in range(n):  # one epoch: every window of every shard read once
                x, _ = next(loader)
                checksum += int(x[0, 0])
            detail = {"batches": n, "tokens": n * BATCH * BLOCK}
        elif job == "eval":
            with torch.no_grad():
                ev = evaluate_lm(model, iter_eval_blocks(val, BLOCK, BATCH, None), token_bytes)
            detail = {"val_tokens": ev["val_tokens"]}
        elif job == "baseline":
            detail = {"unigram_loss": round(unigram_baseline(train, val, VOCAB, token_bytes)["unigram_loss"], 4)}
        else:
            detail = {"prompts": len(sample_prompts(val, BOS))}
    after = _status()
    return {"job": job, "seconds": round(time.perf_counter() - t0, 2), "rss_before_mb": before["VmRSS"] / 1024,
            "peak_rss_mb": after["VmHWM"] / 1024, "peak_anon_mb": peaks.peak["RssAnon"] / 1024,
            "peak_file_mb": peaks.peak["RssFile"] / 1024, **detail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=500_000, help="train tokens (and val tokens) of the 1x corpus")
    ap.add_argument("--scale", type=int, default=10, help="the larger corpus is this many times the 1x one")
    ap.add_argument("--shard-tokens", type=int, default=250_000, help="tokens per train shard")
    ap.add_argument("--child", nargs=2, metavar=("JOB", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="chatforge-mem-") as tmp:
        for scale in (1, args.scale):
            data = write_corpus(Path(tmp) / f"x{scale}", args.tokens * scale, args.shard_tokens, seed=scale)
            for job in JOBS:
                out = subprocess.run([sys.executable, __file__, "--child", job, str(data)], capture_output=True,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                         "OMP_NUM_THREADS", "2")})
                if out.returncode != 0:
                    sys.exit(f"{job} at {scale}x failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[(job, scale)] = r
                print(f"{job:8s} {scale:>3d}x ({args.tokens * scale:>11,} tokens): peak RSS {r['peak_rss_mb']:7.1f} MB "
                      f"(anon {r['peak_anon_mb']:6.1f} MB, mapped file pages {r['peak_file_mb']:6.1f} MB; "
                      f"{r['rss_before_mb']:.1f} MB before the job) in {r['seconds']} s", flush=True)
    for job in JOBS:
        a, b = results[(job, 1)], results[(job, args.scale)]
        print(f"ratio peak_rss {job}: {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
