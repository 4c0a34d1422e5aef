"""The report card: one self-contained HTML file and a Markdown summary of a run or model.

``gather`` reads a run's files (eval.json, metrics.jsonl, answers.jsonl, config.json,
manifest.json, safety/*.json) into a ``ReportData``; ``plots`` draws its curves as PNG;
``render`` writes the HTML (inline CSS, plots as base64 ``data:`` images, no network)
and the Markdown (tables, plots as PNG files beside it); ``sections`` holds the optional
human-eval, registry and safety sections and documents their data contracts. Only the
better/worse rule (``chatforge.train.stage.metric_goal``) brings torch in; a report of a
run takes a few seconds, most of it drawing one figure per stage.
"""

from chatforge.report.gather import ReportData, ReportError, build_report, resolve_target
from chatforge.report.render import write_report

__all__ = ["ReportData", "ReportError", "build_report", "resolve_target", "write_report"]
