"""Full fine-tuning vs LoRA vs a frozen backbone, on one task of an existing run.

Runs the same fine-tuning stage (default: the sentiment classifier) several times on
the run's pre-trained model, each with one way of choosing what trains, and prints
one table: trainable parameters, wall time, the task metric and forgetting (change
of held-out pre-training perplexity). Needs a run whose pre-training has finished
(`chatforge pipeline run` first). Each variant's eval.json is kept under
runs/<run>/finetune/compare-<stage>/<variant>.json.

    .venv/bin/python bench/finetune_methods.py [--name default] [--stage sentiment]
"""

from __future__ import annotations

import argparse
import json
import shutil

from chatforge.config import load_config
from chatforge.paths import RunPaths
from chatforge.stages import finetune_stages, get_stage
from chatforge.train.stage import run_stage

VARIANTS = {
    "full": [],
    "lora-r8": ["lora_r=8"],
    "frozen-backbone": ["freeze=backbone"],
    "full+replay0.2+lr0.3": ["replay=0.2", "backbone_lr_scale=0.3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="default", help="run name under --runs-dir")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--stage", default="sentiment", choices=[d.name for d in finetune_stages()])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra KEY=VALUE overrides")
    args = ap.parse_args()

    rows = []
    stage_out = RunPaths.of(args.runs_dir, args.name).stage(get_stage(args.stage).subdir)
    out_dir = stage_out.root.parent / f"compare-{args.stage}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        sets = VARIANTS[variant]
        overrides = [f"name={json.dumps(args.name)}", f"runs_dir={json.dumps(args.runs_dir)}", *args.overrides,
                     *(f"{args.stage}.{s}" for s in sets)]
        cfg = load_config(overrides=overrides)
        ev = run_stage(cfg, args.stage)
        shutil.copy(stage_out.eval, out_dir / f"{variant}.json")
        train = ev["train"]
        rows.append((variant, train["trainable_params"], train["total_params"], ev["wall_time_s"],
                     ev["primary"]["name"], ev["primary"]["value"], ev["metrics"]["forgetting_ppl_change_pct"]))

    print(f"\n{args.stage}: full fine-tuning vs LoRA vs frozen backbone ({args.name})")
    print(f"| method | trainable params | wall time (s) | {rows[0][4]} | pre-training ppl change |")
    print("|---|---|---|---|---|")
    for variant, trainable, total, wall, _, value, forget in rows:
        print(f"| {variant} | {trainable:,} of {total:,} ({100 * trainable / total:.1f}%) | {wall:.0f} | "
              f"{value:.3f} | {forget:+.1f}% |")
    print(f"\n(eval.json of each variant in {out_dir}; the stage's own output holds the last variant)")


if __name__ == "__main__":
    main()
