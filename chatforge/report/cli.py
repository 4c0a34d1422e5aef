"""``chatforge report``: write a run's (or a model's) report card and print where it is.

    chatforge report                              # runs/default -> runs/default/report/report.{html,md}
    chatforge report --name mine                  # runs/mine
    chatforge report sft@8067d3b4d1ac --name mine # one model's lineage only
    chatforge report --compare runs/a runs/b      # two runs (or two models) side by side
    chatforge report --db postgresql://...        # human-eval results from that feedback store

The human-evaluation section comes from the feedback store (``--db``, else the run's
``feedback.db`` when it exists): every blind comparison ``chatforge align compare queue``
made (``comparison_result``), and ``chatforge.eval.human.human_eval_stats`` when that
module is installed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from chatforge.paths import RunPaths
from chatforge.report.gather import ReportError, build_report, resolve_target
from chatforge.report.render import write_report
from chatforge.stages import TRAINING_STAGES


def human_from_store(db_url: str) -> dict[str, Any] | None:
    """The ``human`` section (``chatforge.report.gather``) from a feedback store; None when it holds none."""
    from chatforge.align.review import comparison_result
    from chatforge.errors import ChatforgeError
    from chatforge.store import service
    from chatforge.store.db import Store

    store = Store(db_url)
    try:
        out: dict[str, Any] = {"tables": [], "comparisons": []}
        from chatforge.eval.human import human_eval_stats
        from chatforge.store.stats_cli import tables

        stats = human_eval_stats(store)
        if stats["counts"]["ratings"] or stats["counts"]["comparisons"]:
            out["tables"] = tables(stats)  # the tables `chatforge feedback stats` prints
        for ds in service.list_datasets(store):
            if ds["kind"] != "prompts" or not ds["name"].startswith("blind "):  # queue_comparison's names
                continue
            try:
                result = comparison_result(store, ds["name"])
            except ChatforgeError:
                continue  # a dataset that only looks like a comparison
            if result["judgements"]:
                out["comparisons"].append(result)
    finally:
        store.close()
    return out if out["tables"] or out["comparisons"] else None


def registry_section(runs_dir: str | Path, name: str) -> dict[str, Any] | None:
    """The registry's versions of ``name`` (the run) as the report's registry section: aliases, parents, and
    each round's decision beside its challenger. None when nothing is registered."""
    from chatforge.registry import Registry

    reg = Registry(runs_dir)
    versions = reg.list(name)
    if not versions:
        return None
    decided = {d["challenger"]: d for d in reg.decisions(name)}
    rows = []
    for v in versions:
        d = decided.get(v.version)
        rows.append({"stage": v.stage, "version": v.version, "parent": v.parent or "",
                     "aliases": ["@" + a for a in reg.aliases_of(v.version)], "created_at": v.created_at,
                     "decision": f"round {d['round']}: {d['decision']}" if d else "",
                     "reason": "; ".join(d["reasons"]) if d else ""})
    decisions = []
    for d in reg.decisions(name):
        rows_d = [[metric, g["champion"], g["challenger"], g["diff"], f"{g['ci95'][0]:+.3f}..{g['ci95'][1]:+.3f}",
                   g["n"], g["tolerance"], "not worse" if g["ok"] else "may be worse"]
                  for metric, g in (d.get("guards") or {}).items()]
        decisions.append({"title": f"round {d.get('round')}: {d.get('decision')} (challenger {d.get('challenger')} vs "
                                   f"champion {d.get('champion')})",
                          "columns": ["guarded metric", "champion", "challenger", "change", "95% CI of the change",
                                      "prompts", "tolerance", "verdict"], "rows": rows_d,
                          "note": f"paired by held-out prompt ({d.get('held_out')}); feedback from "
                                  f"{', '.join(d.get('feedback_sources') or []) or 'nobody'}"})
    return {"versions": rows, "decisions": decisions}


def write_run_report(run_dir: str | Path, db_url: str | None = None) -> tuple[Path, Path] | None:
    """The report card of a whole run, into ``<run>/report/``; what ``chatforge pipeline run`` ends with.
    None while no training stage has results (a pipeline run of the data stages only)."""
    run = RunPaths(Path(run_dir))
    if not any(run.stage(d.subdir).eval.is_file() for d in TRAINING_STAGES):
        return None
    if db_url is None and run.feedback_db.is_file():
        from chatforge.store.db import default_db_url

        db_url = default_db_url(run.root)
    human = human_from_store(db_url) if db_url else None
    registry = registry_section(run.root.parent, run.name)
    return write_report(build_report(run.root, human=human, registry=registry), run.root / "report")


def cmd_report(args: argparse.Namespace) -> None:
    runs_dir = args.runs_dir or "runs"
    target = args.target or (None if args.compare and not args.name else
                             str(RunPaths.of(runs_dir, args.name or "default").root))
    if target is not None and args.name and not Path(target).is_dir() and ":" not in target:
        target = f"{args.name}:{target}"  # STAGE[@VERSION] of the --name run
    run = resolve_target(target, runs_dir)[0] if target is not None else resolve_target(args.compare[0], runs_dir)[0]
    db_url = args.db
    if db_url is None and run.feedback_db.is_file():
        from chatforge.store.db import default_db_url

        db_url = default_db_url(run.root)
    human = human_from_store(db_url) if db_url else None
    data = build_report(target, compare=tuple(args.compare) if args.compare else None, human=human,
                        registry=registry_section(run.root.parent, run.name), runs_dir=runs_dir)
    out = Path(args.out) if args.out else run.root / "report" / ("compare" if target is None else "")
    html_path, md_path = write_report(data, out)
    print(html_path)
    print(md_path)


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="the report card: one self-contained HTML file and a Markdown summary")
    p.add_argument("target", nargs="?", metavar="RUN_OR_MODEL",
                   help="run directory, model directory, STAGE or STAGE@VERSION of the run (default: the --name run)")
    p.add_argument("--name", help="run name (default: 'default')")
    p.add_argument("--runs-dir", help="directory holding runs (default: runs)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two runs or models side by side (metric deltas, curves overlaid)")
    p.add_argument("--out", help="output directory (default: RUN/report, or RUN/report/compare for --compare alone)")
    p.add_argument("--db", help="feedback database URL for the human-eval section (default: the run's feedback.db)")
    p.set_defaults(func=cmd_report)


__all__ = ["ReportError", "add_report_parser", "cmd_report", "human_from_store", "write_run_report"]
