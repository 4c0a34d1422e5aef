"""The report card: one self-contained HTML file and a Markdown summary of a run or model.

``gather`` reads a run's files (eval.json, metrics.jsonl, answers.jsonl, config.json,
manifest.json, safety/*.json) into a ``ReportData``; ``plots`` draws its curves as PNG;
``render`` writes the HTML (inline CSS, plots as base64 ``data:`` images, no network)
and the Markdown (tables, plots as PNG files beside it). Nothing here imports torch, so
a report takes seconds. The optional sections' data contracts are in ``gather``'s
docstring.
"""

from chatforge.report.gather import ReportData, ReportError, build_report, resolve_target
from chatforge.report.render import write_report

__all__ = ["ReportData", "ReportError", "build_report", "resolve_target", "write_report"]
