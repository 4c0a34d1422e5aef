"""Assistant quality over seeds: train the preset's support assistant from scratch N times and
report SupportWorld's checks as a distribution, not one run.

Each seed is a fresh run (``RUNS_DIR/quality-<precision>-s<seed>``) of the main job's assistant
path: SupportWorld -> collect -> clean -> tokenizer -> shards -> pre-training -> SFT, with
``pretrain.seed`` and ``sft.seed`` set to the seed (the data stays the same, so the seeds differ
only in initialisation and batch order). It reads each run's ``finetune/sft/eval.json`` (the checks
on the held-out answers SFT writes) and ``pretrain/eval.json`` (perplexity, copy/lookup probes),
then prints one row per seed, the mean and standard deviation of every check, the wall time, and
each target of the assistant-quality issue beside the mean. The baseline line is the held-out
reference answers of the data, run through the same checks (what a perfect reader scores) and a
copy of one fixed training answer for every prompt (what an assistant that ignores the record
scores).

    .venv/bin/python bench/assistant_quality.py [--seeds 3] [--dtype fp32|bf16|auto] [--set KEY=VALUE]
    .venv/bin/python bench/assistant_quality.py --full   # the whole main job per seed (every stage)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSISTANT_STAGES = ("supportworld", "collect", "clean", "tokenizer", "shard", "pretrain", "sft")
CHECKS = ("status", "order_number", "name", "intent", "no_leak", "ended")
# The assistant-quality issue's targets for the tiny main job (mean over seeds); no_leak is the share
# of answers revealing no other customer's data (target: at most 1% reveal).
TARGETS = {"status": 0.90, "order_number": 0.85, "name": 0.85, "intent": 0.75, "no_leak": 0.99, "ended": 0.99}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    name = f"quality-{args.dtype}-s{seed}"
    cmd = [sys.executable, "-m", "chatforge", "pipeline", "run", "--preset", args.preset, "--name", name,
           "--runs-dir", args.runs_dir, "--force", "all"]
    if not args.full:
        for s in ASSISTANT_STAGES:
            cmd += ["--only", s]
    sets = [f"pretrain.seed={seed}", f"sft.seed={seed}", *args.overrides]
    if args.dtype != "auto":
        sets += [f"{sec}.dtype={args.dtype}" for sec in ("pretrain", "sft")]
    for s in sets:
        cmd += ["--set", s]
    print(f"seed {seed}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    log = Path(args.runs_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"}).returncode
    wall = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"seed {seed}: the pipeline failed (exit {rc}); see {log}")
    run = Path(args.runs_dir) / name
    sft = json.loads((run / "finetune" / "sft" / "eval.json").read_text())
    pre = json.loads((run / "pretrain" / "eval.json").read_text())
    m = sft["metrics"]
    row = {"seed": seed, "wall_s": wall, "pretrain_s": pre.get("wall_time_s"), "sft_s": sft.get("wall_time_s"),
           "val_ppl": pre["metrics"].get("val_ppl"), "copy_ratio": pre["metrics"].get("probe_repeat_ratio"),
           "lookup_top1": pre["metrics"].get("probe_lookup_top1"), "bleu": m.get("test_bleu"),
           "answers": m.get("checked"), "precision": sft.get("train", {}).get("dtype")}
    for c in CHECKS:
        row[c] = m.get(f"test_check_{c}")
    print(f"seed {seed}: " + ", ".join(f"{c} {fmt(row[c])}" for c in CHECKS) + f"; {wall:.0f}s", flush=True)
    return row


def fmt(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def cell(row: dict, col: str) -> str:
    if col == "seed":
        return str(row[col])
    return fmt(row[col]) if col in CHECKS else fmt(row[col], False)


def reference_rows(run: Path) -> list[str]:
    """The checks on the held-out reference answers and on one fixed training answer for every prompt."""
    from chatforge.eval.checks import SupportChecks, is_support_row, support_prompt

    data = run / "supportworld" / "conversations"
    checks = SupportChecks.for_data(data / "test.jsonl")
    rows = [json.loads(line) for line in (data / "test.jsonl").open()]
    rows = [r for r in rows if is_support_row(r)]
    train = next(json.loads(line) for line in (data / "train.jsonl").open() if is_support_row(json.loads(line)))
    fixed = support_prompt(train)[1]
    out = []
    for label, answers in (("references", [support_prompt(r)[1] for r in rows]), ("one fixed answer", [fixed] * len(rows))):
        rep = checks.report(rows, answers, [True] * len(rows))["checks"]
        out.append(f"{label:>16}: " + ", ".join(f"{c} {fmt(rep[c]['rate'])}" for c in CHECKS if c in rep)
                   + f" (n={len(rows)})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds (1337, 1338, ...)")
    ap.add_argument("--first-seed", type=int, default=1337)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="precision of pre-training and SFT (auto = the machine's choice)")
    ap.add_argument("--runs-dir", default="runs/bench")
    ap.add_argument("--full", action="store_true", help="run every stage of the main job, not just the assistant's")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE overrides")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine_line

    print(machine_line(os.cpu_count() or 1))
    rows = [run_seed(args.first_seed + k, args) for k in range(args.seeds)]
    print(f"\npreset {args.preset}, dtype {args.dtype} ({rows[0]['precision']}), overrides: {args.overrides or 'none'}")
    cols = ["seed", *CHECKS, "bleu", "val_ppl", "copy_ratio", "pretrain_s", "sft_s", "wall_s"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print("  ".join(f"{cell(r, c):>12}" for c in cols))
    print("\nmean ± sd over seeds (answers per seed: " + ", ".join(str(r["answers"]) for r in rows) + ")")
    for c in CHECKS + ("bleu", "val_ppl", "wall_s"):
        vals = [r[c] for r in rows if r[c] is not None]
        if not vals:
            continue
        mean, sd = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
        shown = f"{100 * mean:.1f}% ± {100 * sd:.1f}" if c in CHECKS else f"{mean:.3g} ± {sd:.2g}"
        goal = f"   target >= {100 * TARGETS[c]:.0f}%: {'met' if mean >= TARGETS[c] else 'NOT met'}" \
            if c in TARGETS else ""
        print(f"{c:>14}: {shown}{goal}")
    print("\nbaselines (same checks, same held-out prompts):")
    for line in reference_rows(Path(args.runs_dir) / f"quality-{args.dtype}-s{args.first_seed}"):
        print(line)


if __name__ == "__main__":
    main()
