"""A ``ReportData`` as one self-contained HTML file and a Markdown summary.

The HTML has its CSS inline and its plots as base64 PNG ``data:`` images: no script, no
font, no link to anything, so it opens offline, mails as one file and passes the web
app's strict Content-Security-Policy (``img-src data:``). The Markdown has the same
tables for pasting into an issue, with the plots as PNG files beside it (``plots/``).
Every text from the run (answers, prompts) is escaped.
"""

from __future__ import annotations

import base64
import html
import shutil
from pathlib import Path
from typing import Any

from chatforge import __version__
from chatforge.io import atomic_write
from chatforge.report.gather import MetricRow, ReportData, StageReport, compare_rows
from chatforge.report.plots import has_curves, stage_curves
from chatforge.report.sections import generic_tables, registry_tables

DIFFERENT_STAGES = ("two different stages: a metric of the same name may be measured on different data (val_loss "
                    "of DPO is its loss on preference pairs); the test_* answer metrics are comparable when both "
                    "answered the same held-out prompts")


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def change(row: MetricRow) -> tuple[str, str]:
    """``(text, css class)`` of a row's change from the parent: the arrow says the direction, the word and
    colour say better or worse (a perplexity that rose is ▲ worse)."""
    v = row.verdict
    if v is None:
        return "", ""
    if v == "same":
        return "= same", "same"
    delta = row.value - row.parent
    pct = 100 * delta / abs(row.parent) if row.parent else None
    rel = "" if pct is None else f" ({pct:+.1f}%)" if abs(pct) >= 0.1 else f" ({pct:+.2g}%)"
    arrow = "▲" if delta > 0 else "▼"
    word = {"better": "better", "worse": "worse", "changed": ""}[v]
    return f"{arrow} {delta:+.4g}{rel} {word}".rstrip(), v


def _e(x: Any) -> str:
    return html.escape(fmt(x) if not isinstance(x, str) else x)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
margin:0 auto;max-width:1100px;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin:22px 0 6px}.meta{color:#57606a;font-size:12.5px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#1a7f37;font-weight:600}.worse{color:#cf222e;font-weight:600}.same,.changed{color:#57606a}
.chain{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin:6px 0}
.node{border:1px solid #8c959f;border-radius:6px;padding:3px 8px;background:#f6f8fa;font-size:13px}
.node code{font-size:12px}.node.old{border-style:dashed}.arrow{color:#57606a}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.answers td{max-width:330px;white-space:pre-wrap;word-break:break-word;font-size:12.5px}
.prompt{color:#57606a;font-size:12px}.note{color:#57606a;font-size:12px;margin:2px 0}
.primary td{background:#fff8c5}
@media print{body{max-width:none;padding:0}h2{break-before:auto}section,table,img{break-inside:avoid}}
"""


# --------------------------------------------------------------------------- HTML


def _html_table(columns: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr{r[0]}>{''.join(r[1:])}</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(x: Any, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    return f'<td class="{classes}">{_e(x)}</td>' if classes else f"<td>{_e(x)}</td>"


def _metric_rows_html(rows: list[MetricRow], primary: str | None) -> list[list[str]]:
    out = []
    for r in rows:
        text, cls = change(r)
        out.append([' class="primary"' if r.name == primary else "", _td(r.name), _td(r.value, True),
                    _td(r.parent, True), _td(text, True, cls)])
    return out


def _chain_html(chain: list[dict[str, Any]]) -> str:
    nodes = []
    for n in chain:
        old = "" if n.get("current") else " old"
        extra = " (missing)" if n.get("missing") else ("" if n.get("current") else " (older version)")
        nodes.append(f'<span class="node{old}"><b>{html.escape(str(n["stage"]))}</b>@<code>'
                     f'{html.escape(str(n["version"]))}</code>{html.escape(extra)}</span>')
    return '<div class="chain">' + '<span class="arrow">→</span>'.join(nodes) + "</div>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _stage_meta(s: StageReport) -> str:
    t = s.train
    bits = [f"task {s.task}"]
    if s.parent:
        bits.append(f"from {s.parent.get('stage')}@{s.parent.get('version')}")
    if t.get("steps") is not None:
        bits.append(f"{fmt(t.get('steps'))} steps")
    if t.get("tokens"):
        bits.append(f"{fmt(t['tokens'])} tokens")
    if t.get("tokens_per_s"):
        bits.append(f"{fmt(t['tokens_per_s'])} tok/s")
    if t.get("method"):
        bits.append(f"{t['method']}, {fmt(t.get('trainable_params'))} of {fmt(t.get('total_params'))} params trained")
    if t.get("device"):
        bits.append(f"{t.get('dtype', '')} on {t['device']}".strip())
    if s.wall_time_s is not None:
        bits.append(f"{fmt(s.wall_time_s)} s")
    return " · ".join(bits)


def _answer_html(group: dict[str, Any]) -> str:
    cols = ["prompt", "reference", *group["stages"]]
    rows = []
    for p in group["prompts"]:
        prompt = p.get("prompt")
        if isinstance(prompt, list):  # chat messages: the last user turn, the rest is the record
            text = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
        else:
            text = str(prompt or "")
        cells = ["", f'<td>{html.escape(text)}<div class="prompt">{html.escape(p["where"])}</div></td>',
                 f"<td>{html.escape(str(p.get('reference') or ''))}</td>"]
        for name in group["stages"]:
            a = p["answers"].get(name) or {}
            checks = a.get("checks")
            mark = ""
            if isinstance(checks, dict) and checks:
                passed = sum(1 for v in checks.values() if v is True)
                judged = sum(1 for v in checks.values() if v is not None)
                mark = f'<div class="prompt">checks passed {passed}/{judged}</div>'
            cells.append(f"<td>{html.escape(str(a.get('answer') or '—'))}{mark}</td>")
        rows.append(cells)
    return _html_table(cols, rows, "answers")


def _generic_html(t: dict[str, Any]) -> str:
    out = f"<h3>{html.escape(t['title'])}</h3>"
    rows = [[""] + [_td(c, not isinstance(c, str)) for c in r] for r in t["rows"]]
    out += _html_table(t["columns"], rows)
    if t.get("note"):
        out += f'<p class="note">{html.escape(t["note"])}</p>'
    return out


def render_html(data: ReportData, plots: dict[str, bytes]) -> str:
    parts = [f"<h1>chatforge report card — {html.escape(data.title)}</h1>",
             f'<p class="meta">written {html.escape(data.created_at)} by chatforge {html.escape(__version__)}'
             + (f" · run directory <code>{html.escape(data.run)}</code>" if data.run else "") + "</p>"]
    if data.lineage:
        parts.append("<h2>Lineage</h2>")
        parts += [_chain_html(c) for c in data.lineage]
        parts.append('<p class="note">each model records the model it was trained from (config.json '
                     '<code>parent</code>); a dashed box is a version since replaced in its stage\'s '
                     '<code>model/</code> (kept under <code>versions/</code>)</p>')
    if data.stages:
        parts.append("<h2>Summary</h2>")
        rows = []
        for s in data.stages:
            r = s.row(s.primary["name"]) or MetricRow(s.primary["name"], s.primary.get("value"))
            text, cls = change(r)
            rows.append(["", _td(s.name), f"<td><code>{html.escape(s.version)}</code></td>",
                         _td(f"{s.parent.get('stage')}@{s.parent.get('version')}" if s.parent else "—"),
                         _td(r.name), _td(r.value, True), _td(r.parent, True), _td(text, True, cls),
                         _td(s.wall_time_s, True)])
        parts.append(_html_table(["stage", "version", "parent", "primary metric", "value", "parent's", "change",
                                  "wall time (s)"], rows))
        parts.append('<p class="note">▲/▼: the direction of the change from the parent; green = better, red = '
                     'worse (by whether the metric is better high or low); a parent figure is shown only where it '
                     'was measured on the same data or prompts</p>')
        parts.append("<h2>Stages</h2>")
        for s in data.stages:
            parts.append(f'<section><h3>{html.escape(s.name)} <code>{html.escape(s.version)}</code></h3>'
                         f'<p class="meta">{html.escape(_stage_meta(s))}</p>')
            parent = (s.parent or {}).get("stage") or "parent"
            parts.append(_html_table(["metric", s.name, parent, "change"],
                                     _metric_rows_html(s.rows, s.primary["name"])))
            sources = sorted({r.parent_source for r in s.rows if r.parent is not None and r.parent_source})
            parts += [f'<p class="note">{html.escape(parent)} column: {html.escape(src)}</p>' for src in sources]
            parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
            if s.subdir in plots:
                parts.append(_img(plots[s.subdir], f"{s.name} training and evaluation curves"))
            parts.append("</section>")
    if data.answer_groups:
        parts.append("<h2>Sample answers</h2>")
        for g in data.answer_groups:
            parts.append(f"<h3>{html.escape(' vs '.join(g['stages']))}</h3>")
            parts.append(_answer_html(g))
    if data.compare:
        a, b = data.compare
        parts.append(f"<h2>Comparison: {html.escape(a.label)} vs {html.escape(b.label)}</h2>")
        parts.append(f'<p class="note">change = {html.escape(b.label)} − {html.escape(a.label)}; green = '
                     f'{html.escape(b.label)} is better</p>')
        for i, (la, lb, rows) in enumerate(compare_rows(a, b)):
            parts.append(f"<h3>{html.escape(la)} vs {html.escape(lb)}</h3>")
            if la.split("@")[0] != lb.split("@")[0]:
                parts.append(f'<p class="note">{html.escape(DIFFERENT_STAGES)}</p>')
            parts.append(_html_table(["metric", a.label, b.label, "change"],
                                     [["", _td(r.name), _td(r.parent, True), _td(r.value, True),
                                       _td(change(r)[0], True, change(r)[1])] for r in rows]))
            if f"compare-{i}" in plots:
                parts.append(_img(plots[f"compare-{i}"], f"{la} vs {lb} curves"))
    if data.human:
        parts.append("<h2>Human evaluation</h2>")
        parts += [_generic_html(t) for t in generic_tables(data.human)]
    if data.registry:
        parts.append("<h2>Model registry</h2>")
        parts += [_generic_html(t) for t in registry_tables(data.registry)]
    if data.safety:
        parts.append("<h2>Safety</h2>")
        for s in data.safety:
            title = s["title"] + (f" ({s['model']})" if s.get("model") else "")
            if s.get("tables"):
                parts += [_generic_html({**t, "title": f"{title}: {t['title']}" if t["title"] else title})
                          for t in s["tables"]]
            else:
                parts.append(_generic_html({"title": title, "columns": ["metric", "value"],
                                            "rows": [[k, v] for k, v in s["metrics"].items()]}))
            if s.get("cases"):
                cols = list(dict.fromkeys(c for x in s["cases"] for c in x))
                parts.append(_html_table(cols, [[""] + [_td(str(c.get(k, ""))) for k in cols]
                                                for c in s["cases"][:10]], "answers"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>chatforge report — {html.escape(data.title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


# --------------------------------------------------------------------------- Markdown


def _md_cell(x: Any) -> str:
    return (fmt(x) if not isinstance(x, str) else x).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_rows(rows: list[MetricRow], primary: str | None = None) -> list[list[Any]]:
    return [[f"**{r.name}**" if r.name == primary else r.name, r.value, r.parent, change(r)[0]] for r in rows]


def render_markdown(data: ReportData, plot_files: dict[str, str]) -> str:
    out = [f"# chatforge report card — {data.title}", "", f"_written {data.created_at} by chatforge {__version__}_", ""]
    if data.lineage:
        out += ["## Lineage", ""]
        out += ["- " + " → ".join(f"{n['stage']}@`{n['version']}`" + ("" if n.get("current") else " (older)")
                                  for n in c) for c in data.lineage]
        out.append("")
    if data.stages:
        out += ["## Summary", ""]
        rows = []
        for s in data.stages:
            r = s.row(s.primary["name"]) or MetricRow(s.primary["name"], s.primary.get("value"))
            rows.append([s.name, f"`{s.version}`", f"{s.parent['stage']}@{s.parent['version']}" if s.parent else "—",
                         r.name, r.value, r.parent, change(r)[0], s.wall_time_s])
        out += [_md_table(["stage", "version", "parent", "primary", "value", "parent's", "change", "wall (s)"], rows),
                "", "▲/▼ = direction of the change; better/worse by whether the metric is better high or low.", ""]
        for s in data.stages:
            parent = (s.parent or {}).get("stage") or "parent"
            out += [f"### {s.name} `{s.version}`", "", _stage_meta(s), "",
                    _md_table(["metric", s.name, parent, "change"], _md_rows(s.rows, s.primary["name"])), ""]
            out += [f"_{n}_" for n in s.notes]
            if s.subdir in plot_files:
                out += [f"![{s.name} curves]({plot_files[s.subdir]})", ""]
    if data.answer_groups:
        out += ["## Sample answers", ""]
        for g in data.answer_groups:
            out += [f"### {' vs '.join(g['stages'])}", ""]
            rows = []
            for p in g["prompts"]:
                prompt = p.get("prompt")
                text = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "") \
                    if isinstance(prompt, list) else str(prompt or "")
                rows.append([text, p.get("reference") or "",
                             *[(p["answers"].get(n) or {}).get("answer") or "—" for n in g["stages"]]])
            out += [_md_table(["prompt", "reference", *g["stages"]], rows), ""]
    if data.compare:
        a, b = data.compare
        out += [f"## Comparison: {a.label} vs {b.label}", "", f"change = {b.label} − {a.label}", ""]
        for i, (la, lb, rows) in enumerate(compare_rows(a, b)):
            out += [f"### {la} vs {lb}", ""]
            if la.split("@")[0] != lb.split("@")[0]:
                out += [f"_{DIFFERENT_STAGES}_", ""]
            out += [_md_table(["metric", a.label, b.label, "change"],
                              [[r.name, r.parent, r.value, change(r)[0]] for r in rows]), ""]
            if f"compare-{i}" in plot_files:
                out += [f"![{la} vs {lb}]({plot_files[f'compare-{i}']})", ""]
    tables = []
    if data.human:
        tables.append(("Human evaluation", generic_tables(data.human)))
    if data.registry:
        tables.append(("Model registry", registry_tables(data.registry)))
    if data.safety:
        tables.append(("Safety", [t for s in data.safety for t in (
            [{**t, "title": f"{s['title']}: {t['title']}" if t["title"] else s["title"]} for t in s["tables"]]
            if s.get("tables") else [{"title": s["title"], "columns": ["metric", "value"],
                                      "rows": [[k, v] for k, v in s["metrics"].items()]}])]))
    for heading, ts in tables:
        out += [f"## {heading}", ""]
        for t in ts:
            out += [f"### {t['title']}", "", _md_table(t["columns"], t["rows"]), ""]
            if t.get("note"):
                out += [f"_{t['note']}_", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- writing


def draw_plots(data: ReportData) -> dict[str, bytes]:
    """PNG bytes by key: a stage's subdir, or ``compare-<i>`` for the i-th compared pair."""
    plots = {s.subdir: stage_curves([(s.name, s)]) for s in data.stages if has_curves(s)}
    if data.compare:
        a, b = data.compare
        by_label = {s.label: s for s in [*a.stages, *b.stages]}
        for i, (la, lb, _) in enumerate(compare_rows(a, b)):
            sa, sb = by_label[la], by_label[lb]
            if has_curves(sa) or has_curves(sb):
                plots[f"compare-{i}"] = stage_curves([(a.label, sa), (b.label, sb)])
    return plots


def write_report(data: ReportData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``plots/*.png``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(data)
    plot_dir = out / "plots"
    if plot_dir.is_dir():
        shutil.rmtree(plot_dir)  # plots of stages no longer in the run must not linger
    files = {}
    for key, png in plots.items():
        name = key.replace("/", "-") + ".png"
        plot_dir.mkdir(exist_ok=True)
        with atomic_write(plot_dir / name, "wb", encoding=None) as f:
            f.write(png)
        files[key] = f"plots/{name}"
    html_path, md_path = out / "report.html", out / "report.md"
    with atomic_write(html_path) as f:
        f.write(render_html(data, plots))
    with atomic_write(md_path) as f:
        f.write(render_markdown(data, files))
    return html_path, md_path
