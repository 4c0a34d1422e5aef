"""Data-path benchmark: clean and tokenise throughput on a ~50 MB corpus, and encode
speed of chatforge's tokenizer against the `tokenizers` library's own batch encoder
and against `tiktoken` loaded with the same merges.

    python bench/data_path.py            # ~50 MB SupportWorld corpus (about 5 minutes on 2 cores)
    python bench/data_path.py --mb 10    # quicker

Run it on an idle machine: a second job on 2 cores halves every figure. The corpus
is the SupportWorld generator's (deterministic from --seed), plus Tiny Shakespeare
from ../shared/data when it is there, so the corpus is not all one style.
Ends with one ``ratio NAME: VALUE`` line per comparison (chatforge / peer, higher is
better).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from chatforge.config import CleanConfig, CollectConfig, ShardConfig, SupportWorldConfig, TokenizerConfig
from chatforge.data.clean import clean
from chatforge.data.collect import collect
from chatforge.data.shard import shard_corpus
from chatforge.data.supportworld import generate
from chatforge.errors import ChatforgeError
from chatforge.io import read_jsonl
from chatforge.tokenizer import train_tokenizer


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _best_of(n: int, fn) -> float:
    """Best wall time of n calls: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB")
    ap.add_argument("--workers", type=int, default=0, help="clean worker processes (0 = one per core)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--encode-mb", type=float, default=10.0, help="text used for the encoder comparison")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="chatforge-bench-"))
    print(f"work dir: {work}  cores: {os.cpu_count()}")

    # 1. Corpus.
    sw_cfg = SupportWorldConfig(seed=args.seed, corpus_mb=args.mb)
    _, t = _timed(generate, sw_cfg, work / "sw")
    sources = [str(work / "sw" / "corpus.jsonl")]
    shakespeare = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
    if shakespeare.exists():
        sources.append(str(shakespeare))
    stats, t_collect = _timed(collect, sources, work / "raw.jsonl", CollectConfig())
    raw_mb = (work / "raw.jsonl").stat().st_size / 1e6
    print(f"generate: {t:.1f}s   collect: {stats['docs']} docs, {raw_mb:.1f} MB in {t_collect:.1f}s "
          f"({raw_mb / t_collect:.1f} MB/s)")

    # 2. Clean.
    report, t_clean = _timed(clean, work / "raw.jsonl", work / "clean.jsonl", work / "report.json",
                             CleanConfig(workers=args.workers))
    print(f"clean: {report['input']['docs']} -> {report['output']['docs']} docs in {t_clean:.1f}s: "
          f"{raw_mb / t_clean:.2f} MB/s")

    # 3. Tokenizer training (capped: the benchmark is about encoding) and tokenisation into shards.
    texts = [row["text"] for _, row in read_jsonl(work / "clean.jsonl")]
    clean_mb = sum(len(t.encode()) for t in texts) / 1e6
    tok, t_train = _timed(train_tokenizer, iter(texts), TokenizerConfig(vocab_size=args.vocab, max_train_mb=10))
    print(f"tokenizer train (10 MB cap, vocab {tok.vocab_size}): {t_train:.1f}s")
    shard_stats, t_shard = _timed(shard_corpus, work / "clean.jsonl", tok, work / "shards", ShardConfig())
    print(f"tokenise + shard: {clean_mb:.1f} MB in {t_shard:.1f}s: {clean_mb / t_shard:.2f} MB/s")

    # 4. Encoder comparison on the same text, same merges, batch APIs, best of 3.
    sample, size = [], 0
    for text in texts:
        sample.append(text)
        size += len(text.encode())
        if size >= args.encode_mb * 1e6:
            break
    mb = size / 1e6
    hf = tok.hf_tokenizer if hasattr(tok, "hf_tokenizer") else None
    t_ours = _best_of(3, lambda: tok.encode_batch(sample))
    print(f"encode_batch chatforge: {mb / t_ours:.2f} MB/s")
    ratios = {}
    if hf is not None:
        t_hf = _best_of(3, lambda: hf.encode_batch(sample, add_special_tokens=False))
        print(f"encode_batch tokenizers: {mb / t_hf:.2f} MB/s")
        ratios["tokenizers_encode_batch"] = t_hf / t_ours
    try:
        enc = tok.to_tiktoken()
    except ChatforgeError as e:  # tiktoken not installed
        print(f"tiktoken comparison skipped: {e}", file=sys.stderr)
    else:
        threads = os.cpu_count() or 1
        assert enc.encode_ordinary(sample[0]) == tok.encode(sample[0]), "tiktoken export disagrees"
        t_tt = _best_of(3, lambda: enc.encode_ordinary_batch(sample, num_threads=threads))
        print(f"encode_ordinary_batch tiktoken ({threads} threads): {mb / t_tt:.2f} MB/s")
        ratios["tiktoken_encode_batch"] = t_tt / t_ours

    summary = {"corpus_mb": raw_mb, "clean_mb_per_s": raw_mb / t_clean,
               "tokenise_shard_mb_per_s": clean_mb / t_shard, "encode_mb_per_s": mb / t_ours,
               "tokens": shard_stats.get("tokens"), "ratios": ratios}
    print(json.dumps(summary, indent=2, default=str))
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}")


if __name__ == "__main__":
    main()
