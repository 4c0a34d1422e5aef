"""The report's optional sections: human evaluation, the model registry, safety results.

All plain JSON-able dicts, so other modules can hand them in:

``human`` -- human-evaluation tables, e.g. from ``chatforge.eval.human.human_eval_stats``::

    {"tables": [{"title": str, "columns": [str, ...], "rows": [[cell, ...], ...],
                 "note": str (optional)}],
     "comparisons": [<chatforge.align.review.comparison_result dict>, ...] (optional)}

  a cell is a string, a number, a bool or null. A dict without ``tables`` is still shown:
  every value that is a list of dicts becomes a table (columns = their keys), every dict of
  scalars a two-column table, the top-level scalars one more (``generic_tables``).

``registry`` -- model versions and promotion decisions::

    {"versions": [{"stage": str, "version": str, "aliases": [str, ...], "decision": str,
                   "reason": str, "created_at": str, ...}]}

  every key but ``stage`` and ``version`` is optional; other scalar keys become columns. An optional
  ``"decisions": [{"title", "columns", "rows", "note"?}]`` adds one table per promotion decision.

``safety`` -- read from ``runs/<run>/safety/*.json`` (one file per evaluation) and from any
``eval.json`` metric named ``safety/...`` or ``safety_...``::

    {"title": str (optional; default the file name), "model": str (optional),
     "metrics": {name: number}, "cases": [{"prompt": str, "answer": str, "verdict": str}, ...] (optional),
     "tables": [{"title", "columns", "rows", "note"?}] (optional: shown instead of the metric list)}
"""

from __future__ import annotations

import json
from typing import Any

from chatforge.paths import RunPaths
from chatforge.report.gather import ReportError, StageReport, is_number, read_json_file


def safety_results(run: RunPaths, stages: list[StageReport]) -> list[dict[str, Any]]:
    """``runs/<run>/safety/*.json`` and eval.json metrics named ``safety/*`` or ``safety_*`` (module docstring)."""
    out = []
    for path in sorted((run.root / "safety").glob("*.json")):
        obj = read_json_file(path, "safety result")
        metrics = obj.get("metrics", {k: v for k, v in obj.items() if is_number(v)})
        if not isinstance(metrics, dict):
            raise ReportError(f"{path}: malformed safety result: 'metrics' must be an object of numbers")
        cases = obj.get("cases", [])
        if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
            raise ReportError(f"{path}: malformed safety result: 'cases' must be a list of objects")
        tables = obj.get("tables", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) and isinstance(t.get("columns"), list)
                                                   and isinstance(t.get("rows"), list) for t in tables):
            raise ReportError(f"{path}: malformed safety result: 'tables' must be a list of "
                              "{title, columns, rows} objects")
        out.append({"title": str(obj.get("title") or path.stem), "model": obj.get("model"),
                    "metrics": {k: v for k, v in metrics.items() if is_number(v)}, "cases": cases,
                    "tables": [{"title": str(t.get("title", "")), "columns": [str(c) for c in t["columns"]],
                                "rows": [list(r) for r in t["rows"]], "note": str(t.get("note", ""))}
                               for t in tables]})
    for s in stages:
        found = {r.name: r.value for r in s.rows if r.name.startswith(("safety/", "safety_"))}
        if found:
            out.append({"title": f"{s.name} eval.json", "model": s.label, "metrics": found, "cases": [],
                        "tables": []})
    return out



def generic_tables(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Tables (``{"title", "columns", "rows"}``) for the ``human`` section (module docstring)."""
    tables: list[dict[str, Any]] = []
    if isinstance(obj.get("tables"), list):
        for i, t in enumerate(obj["tables"]):
            if not isinstance(t, dict) or not isinstance(t.get("columns"), list) or not isinstance(t.get("rows"), list):
                raise ReportError(f"human-eval table {i}: needs 'columns' and 'rows' lists")
            tables.append({"title": str(t.get("title", f"table {i + 1}")), "columns": [str(c) for c in t["columns"]],
                           "rows": [list(r) for r in t["rows"]], "note": str(t.get("note", ""))})
    for c in obj.get("comparisons", []) or []:
        tables.append(comparison_table(c))
    if tables:
        return tables
    scalars = {k: v for k, v in obj.items() if not isinstance(v, dict | list)}
    for k, v in obj.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(c for x in v for c in x))
            tables.append({"title": k, "columns": cols, "rows": [[_cell(x.get(c)) for c in cols] for x in v],
                           "note": ""})
        elif isinstance(v, dict):
            tables.append({"title": k, "columns": ["name", "value"],
                           "rows": [[kk, _cell(vv)] for kk, vv in v.items()], "note": ""})
    if scalars:
        tables.insert(0, {"title": "summary", "columns": ["name", "value"],
                          "rows": [[k, v] for k, v in scalars.items()], "note": ""})
    return tables


def _cell(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, dict | list) else v


def comparison_table(result: dict[str, Any]) -> dict[str, Any]:
    """A ``chatforge.align.review.comparison_result`` as a table."""
    interval = result.get("interval_95")
    rows = [["aligned model", result.get("aligned")], ["parent model", result.get("parent")],
            ["judgements", result.get("judgements")], ["aligned preferred", result.get("aligned_wins")],
            ["win rate", result.get("win_rate")],
            ["95% interval", f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else None]]
    if result.get("pairwise_agreement") is not None:
        rows.append(["reviewer agreement", result["pairwise_agreement"]])
        rows.append(["prompts ranked by 2+", result.get("agreement_prompts")])
    return {"title": f"blind comparison: {result.get('dataset')}", "columns": ["", "value"], "rows": rows,
            "note": "a judgement is one reviewer's ranking of one prompt; the aligned model wins it when its "
                    "answer is ranked first"}


def registry_table(registry: dict[str, Any]) -> dict[str, Any]:
    versions = registry.get("versions", [])
    if not isinstance(versions, list) or not all(isinstance(v, dict) for v in versions):
        raise ReportError("registry: 'versions' must be a list of objects (stage, version, aliases, decision, ...)")
    fixed = ["stage", "version", "aliases", "decision", "reason", "created_at"]
    extra = [k for v in versions for k, x in v.items() if k not in fixed and not isinstance(x, dict | list)]
    cols = [c for c in fixed if any(c in v for v in versions)] + list(dict.fromkeys(extra))
    rows = [[", ".join(map(str, v[c])) if isinstance(v.get(c), list) else v.get(c) for c in cols] for v in versions]
    return {"title": "versions", "columns": cols, "rows": rows, "note": ""}


def registry_tables(registry: dict[str, Any]) -> list[dict[str, Any]]:
    """The versions table, then any further tables the registry section carries (``decisions``: each
    round's comparison of champion and challenger, as ``{"title", "columns", "rows", "note"?}``)."""
    extra = registry.get("decisions", [])
    if not isinstance(extra, list) or not all(isinstance(t, dict) and {"title", "columns", "rows"} <= set(t)
                                              for t in extra):
        raise ReportError("registry: 'decisions' must be a list of tables {title, columns, rows}")
    return [registry_table(registry), *extra]
