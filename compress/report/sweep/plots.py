"""The sweep report's matplotlib figures: perplexity against latency and against weight size,
each with the 2-D Pareto front of that pair and the seeded variants labelled, and the
parameter importances per objective.

Each returns the figure as SVG bytes for the page to embed, or None when there is nothing to
draw; which trials are complete, feasible and on a front comes from `analysis`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compress.metrics import as_float
from compress.report.html import MB
from compress.report.plots import legend_svg
from compress.report.sweep.analysis import is_complete, is_feasible, pareto_front, trial_value

logger = logging.getLogger(__name__)

_BLUE, _RED, _GREY = "#4C72B0", "#C44E52", "0.55"


def front_plot(
    trials: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_scale: float = 1.0,
) -> bytes | None:
    """An SVG scatter of every COMPLETE trial with finite `x_key` and `y_key`, the 2-D Pareto
    front of the feasible ones as a step line, infeasible trials as grey crosses and seeded
    trials labelled by name. None when no trial has both values."""
    points = []
    for trial in trials:
        x, y = trial_value(trial, x_key), trial_value(trial, y_key)
        if is_complete(trial) and x is not None and y is not None:
            if math.isfinite(x) and math.isfinite(y):
                points.append((x / x_scale, y, trial))
    if not points:
        logger.info("no trial has both %s and %s: plot skipped", x_key, y_key)
        return None
    feasible = [p for p in points if is_feasible(p[2])]
    infeasible = [p for p in points if not is_feasible(p[2])]
    on_front = set(pareto_front([(x, y) for x, y, _ in feasible]))

    fig = Figure(figsize=(6.4, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)

    def dots(ps: list, **style: Any) -> None:
        if ps:
            ax.scatter([p[0] for p in ps], [p[1] for p in ps], **style)

    front = sorted((feasible[i] for i in on_front), key=lambda p: (p[0], p[1]))
    rest = [p for i, p in enumerate(feasible) if i not in on_front]
    dots(rest, s=22, color=_BLUE, alpha=0.6, label="feasible trial")
    dots(infeasible, s=26, marker="x", color=_GREY, label="infeasible trial")
    if front:
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        ax.step(xs, ys, where="post", color=_RED, linewidth=1.4, label="2-D Pareto front")
        dots(front, s=34, color=_RED, zorder=3)
    seeds = [p for p in points if p[2].get("seed") is not None]
    dots(
        seeds,
        s=90,
        facecolors="none",
        edgecolors="black",
        linewidths=1.0,
        zorder=4,
        label="seeded variant",
    )
    ax.margins(0.08)
    if seeds:
        _label_seeds(ax, seeds)
    return legend_svg(fig)


LABEL_OFFSETS: tuple[tuple[float, float], ...] = (
    (6, 4),
    (6, -14),
    (-6, 4),
    (-6, -14),
    (6, 18),
    (6, -28),
    (-6, 18),
    (-6, -28),
    (6, 32),
    (6, -42),
)
"""Where a point's label may go, in points from the point (tried in order); a negative x
offset puts the label's right edge there."""


def place_labels(
    anchors: Sequence[tuple[float, float]],
    texts: Sequence[str],
    char_w: float = 5.5,
    line_h: float = 11.0,
) -> list[tuple[float, float]]:
    """An offset from :data:`LABEL_OFFSETS` for each label so that no two labels' boxes
    overlap, nor a label and a point, where an offset allows it (greedy, labels placed from
    the lowest anchor up).

    `anchors` are the points in display units (points, y up), `char_w` and `line_h` a
    character's width and a line's height there. A label no offset frees goes where it
    overlaps least."""

    def box(i: int, off: tuple[float, float]) -> tuple[float, float, float, float]:
        (x, y), w = anchors[i], char_w * len(texts[i])
        left = x + off[0] if off[0] >= 0 else x + off[0] - w
        return left, y + off[1], left + w, y + off[1] + line_h

    def overlap(a: tuple, b: tuple) -> float:
        dx = min(a[2], b[2]) - max(a[0], b[0])
        dy = min(a[3], b[3]) - max(a[1], b[1])
        return max(dx, 0.0) * max(dy, 0.0)

    r = 5.0  # a marker's half-width: labels keep off the points too
    placed: list[tuple] = [(x - r, y - r, x + r, y + r) for x, y in anchors]
    out: list[tuple[float, float]] = [LABEL_OFFSETS[0]] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: (anchors[i][1], anchors[i][0])):
        costs = [sum(overlap(box(i, off), b) for b in placed) for off in LABEL_OFFSETS]
        best = LABEL_OFFSETS[costs.index(min(costs))]  # the first of the least overlapping
        out[i] = best
        placed.append(box(i, best))
    return out


def _label_seeds(ax: Any, seeds: list) -> None:
    """Each seeded trial's name beside its point; names of trials at the same point share one
    label (``int8, int8-again``), and labels are spread so that they do not overprint."""
    groups: dict[tuple[float, float], list[str]] = {}
    for x, y, trial in seeds:
        names = groups.setdefault((x, y), [])
        if str(trial.get("seed")) not in names:
            names.append(str(trial.get("seed")))
    ax.autoscale_view()
    to_points = 72.0 / ax.figure.dpi
    where = list(groups)
    anchors = [tuple(v * to_points for v in ax.transData.transform(xy)) for xy in where]
    texts = [", ".join(names) for names in groups.values()]
    for xy, text, off in zip(where, texts, place_labels(anchors, texts), strict=True):
        ax.annotate(
            text,
            xy,
            xytext=off,
            textcoords="offset points",
            fontsize="small",
            ha="left" if off[0] >= 0 else "right",
            parse_math=False,
            arrowprops={"arrowstyle": "-", "color": _GREY, "linewidth": 0.6}
            if abs(off[1]) > 10
            else None,
        )


def importance_chart(
    importances: Mapping[str, Mapping[str, float]], labels: Mapping[str, str]
) -> bytes | None:
    """Horizontal grouped bars: each parameter's importance for each objective (`labels` maps
    objective key to label). None when there is nothing to show."""
    series = {k: v for k, v in importances.items() if v}
    if not series:
        return None
    params = params_by_importance(series)
    fig = Figure(
        figsize=(7.0, 1.2 + 0.42 * len(params) * max(1, len(series)) ** 0.5),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title("Parameter importance per objective")
    ax.set_xlabel("importance")
    colors = (_BLUE, "#DD8452", "#55A868", "#8172B3", _RED)
    height = 0.8 / len(series)
    for i, (key, values) in enumerate(series.items()):
        ys = [y + (i - (len(series) - 1) / 2) * height for y in range(len(params))]
        widths = [as_float(values.get(p)) or 0.0 for p in params]
        ax.barh(
            ys,
            widths,
            height=height,
            color=colors[i % len(colors)],
            label=str(labels.get(key, key)).replace("$", r"\$"),  # no mathtext
        )
    ax.set_yticks(range(len(params)))
    ax.set_yticklabels(params, parse_math=False)
    ax.invert_yaxis()  # most important on top
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return legend_svg(fig)


def params_by_importance(series: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The parameters of `series`, most important first (by their largest importance)."""
    best: dict[str, float] = {}
    for values in series.values():
        for param, value in values.items():
            best[str(param)] = max(best.get(str(param), 0.0), as_float(value) or 0.0)
    return sorted(best, key=lambda p: (-best[p], p))


def front_plots(trials: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """(title, SVG) pairs: perplexity vs latency ratio and perplexity vs weight MB, each
    skipped when no COMPLETE trial has both metrics."""
    specs = (
        ("Perplexity vs latency", "latency_ratio", "latency (× baseline)", 1.0),
        ("Perplexity vs weight size", "weight_bytes", "weight MB (10⁶ bytes)", MB),
    )
    charts = []
    for title, x_key, x_label, scale in specs:
        svg = front_plot(
            trials,
            x_key,
            "perplexity",
            title=title,
            x_label=x_label,
            y_label="perplexity",
            x_scale=scale,
        )
        if svg is not None:
            charts.append((title, svg))
    return charts
