"""The report's curves as PNG bytes (matplotlib, Agg backend: no display, no network)."""

from __future__ import annotations

import io
from typing import Any

from chatforge.report.gather import StageReport

SKIP_EVAL = ("_tokens", "_n", "_pairs")  # counts logged with the eval lines: not curves
COLORS = ("#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#57606a")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: a server or a headless job has no display
    import matplotlib.pyplot as plt

    return plt


def _numeric(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v:  # drop NaN
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def eval_keys(stage: StageReport) -> list[str]:
    keys = dict.fromkeys(k for r in stage.eval_curve for k in r if k not in ("kind", "step"))
    return [k for k in keys if not k.endswith(SKIP_EVAL) and _numeric(stage.eval_curve, k)[0]]


def has_curves(stage: StageReport) -> bool:
    return bool(_numeric(stage.train_curve, "loss")[0] or eval_keys(stage))


def _finish(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _log_if_wide(ax, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 30:
        ax.set_yscale("log")


def stage_curves(stages: list[tuple[str, StageReport]]) -> bytes:
    """Training loss (left) and held-out metrics (right) against the step; several stages are overlaid
    (``--compare``), each labelled."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.0))
    overlay = len(stages) > 1
    # overlaid, only the held-out metrics every side logged: one side's perplexity beside the other's reward
    # accuracy would squash both onto one useless scale
    shared = set.intersection(*(set(eval_keys(s)) for _, s in stages)) if overlay else None
    for i, (label, s) in enumerate(stages):
        color = COLORS[i % len(COLORS)]
        xs, ys = _numeric(s.train_curve, "loss")
        if xs:
            left.plot(xs, ys, color=color, lw=1.4, label=f"{label} train loss" if overlay else "train loss")
        vx, vy = _numeric(s.eval_curve, "val_loss")
        if vx:
            left.plot(vx, vy, color=color, lw=1.2, ls="--", marker="o", ms=3,
                      label=f"{label} val loss" if overlay else "held-out loss")
        for j, key in enumerate(k for k in eval_keys(s) if k != "val_loss" and (shared is None or k in shared)):
            ex, ey = _numeric(s.eval_curve, key)
            style = {"color": color, "ls": ("-", "--", ":", "-.")[j % 4]} if overlay else \
                {"color": COLORS[j % len(COLORS)]}
            right.plot(ex, ey, marker="o", ms=3, lw=1.2, label=f"{label} {key}" if overlay else key, **style)
    left.set_title("loss", fontsize=10)
    right.set_title("held-out evaluation", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        lines = ax.get_lines()
        if lines:
            _log_if_wide(ax, [y for ln in lines for y in ln.get_ydata()])
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no held-out metric logged by both" if overlay else "nothing logged", ha="center",
                    va="center", transform=ax.transAxes, color="#777")
    fig.tight_layout()
    return _finish(fig)
