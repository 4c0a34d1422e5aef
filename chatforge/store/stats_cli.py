"""``chatforge feedback stats``: the human-evaluation statistics of the feedback store as tables or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci: list[float] | None, digits: int = 2) -> str:
    return "-" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def tables(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """``human_eval_stats``' dict as tables ``{"title", "columns", "rows", "note"}`` of strings: what
    `feedback stats` prints and the report card shows."""
    out: list[dict[str, Any]] = []
    c = stats["counts"]
    where = f"dataset {stats['dataset']!r}" if stats["dataset"] else "the whole store"
    out.append({"title": "Judgements", "columns": ["of", "ratings", "rankings", "pairwise comparisons",
                                                    "from chat thumbs", "reviewers"],
                "rows": [[where, str(c["ratings"]), str(c["rankings"]), str(c["comparisons"]),
                          str(c["thumb_comparisons"]), str(c["reviewers"])]], "note": ""})
    if stats["likert"]:
        rows = [[version, aspect, _f(a["mean"]), _ci(a["ci_95"]), str(a["n"]), str(a["n_responses"]),
                 str(a["n_reviewers"]), _f(a["agreement"]["krippendorff_alpha"]), str(a["agreement"]["n_units"])]
                for version, aspects in stats["likert"].items() for aspect, a in aspects.items()]
        out.append({"title": "Likert ratings (1-5; 95% bootstrap over responses; alpha: Krippendorff, interval)",
                    "columns": ["version", "aspect", "mean", "95% CI", "n", "responses", "reviewers", "alpha",
                                "alpha units"], "rows": rows,
                    "note": "alpha needs responses rated by at least two reviewers" if all(
                        r[-1] == "0" for r in rows) else ""})
    if stats["win_rates"]:
        out.append({"title": "Pairwise win rates (ties count half; 95% Wilson interval)",
                    "columns": ["a", "b", "n", "a wins", "b wins", "ties", "a win rate", "95% CI", "agreement",
                                "pairs"],
                    "rows": [[w["a"], w["b"], str(w["n"]), str(w["wins_a"]), str(w["wins_b"]), str(w["ties"]),
                              _f(w["win_rate_a"], 3), _ci(w["ci_95"], 3), _f(w["agreement"]["pairwise"], 3),
                              str(w["agreement"]["n_pairs"])] for w in stats["win_rates"]], "note": ""})
    bt = stats["bradley_terry"]
    if bt:
        anchor = f"{bt['baseline']} at 1000" if bt["baseline"] else "mean at 1000"
        out.append({"title": f"Bradley-Terry ratings (Elo scale 400, {anchor}; 95% bootstrap over "
                             f"{bt['n_battles']} battles, {bt['n_boot']} rounds)",
                    "columns": ["version", "rating", "95% CI", "n", "wins", "losses", "ties"],
                    "rows": [[r["version"], f"{r['rating']:.0f}", _ci(r["ci_95"], 0), str(r["n"]), str(r["wins"]),
                              str(r["losses"]), str(r["ties"])] for r in bt["ratings"]],
                    "note": "" if bt["connected"] else "some versions were never compared with the rest, even "
                                                       "through others: their ratings relative to the rest come "
                                                       "from the prior alone"})
    rank = stats["agreement"]["rank"]
    if stats["reviewers"]:
        out.append({"title": "Reviewers (agreement with the others)",
                    "columns": ["reviewer", "rank agreement", "shared pairs", "rating corr.", "shared responses",
                                "flagged", "why"],
                    "rows": [[r["reviewer"], _f(r["rank_agreement"]["score"], 3), str(r["rank_agreement"]["n_shared"]),
                              _f(r["rating_correlation"]["score"]), str(r["rating_correlation"]["n_shared"]),
                              "yes" if r["flagged"] else "", "; ".join(r["reasons"])] for r in stats["reviewers"]],
                    "note": f"ranking agreement: {_f(rank['pairwise'], 3)} of {rank['n_pairs']} reviewer pairs "
                            "on shared pairs"})
    return out


def render(stats: dict[str, Any], console: Console) -> None:
    """Print ``human_eval_stats``' dict as rich tables."""
    for t in tables(stats):
        table = Table(title=escape(t["title"]))
        for col in t["columns"]:
            table.add_column(col)
        for row in t["rows"]:
            table.add_row(*(escape(x) for x in row))
        console.print(table)
        if t["note"]:
            console.print(escape(t["note"]))


def cmd_stats(args: argparse.Namespace) -> None:
    from chatforge.store.cli import _open
    from chatforge.store.stats import human_eval_stats

    store = _open(args)
    try:
        stats = human_eval_stats(store, dataset=args.dataset, baseline=args.baseline, n_boot=args.n_boot,
                                 seed=args.seed)
    finally:
        store.close()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        render(stats, Console(highlight=False))


def add_stats_parser(fb_sub: argparse._SubParsersAction, db_args: Any) -> None:
    st = fb_sub.add_parser("stats", help="human-evaluation statistics: Likert means, win rates, Bradley-Terry "
                                         "ratings with bootstrap intervals, agreement, outlying reviewers")
    db_args(st)
    st.add_argument("--dataset", help="only this dataset's ratings and rankings (default: everything, chat "
                                      "thumbs on regenerated answers included)")
    st.add_argument("--baseline", help="the version (MODEL@VERSION) anchored at 1000 (default: the mean is 1000)")
    st.add_argument("--n-boot", type=int, default=1000, help="bootstrap rounds (default 1000)")
    st.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    st.add_argument("--json", action="store_true", help="print the statistics as JSON")
    st.set_defaults(func=cmd_stats)
