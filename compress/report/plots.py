"""Bar charts of each variant's metrics relative to the baseline, rendered to PNG bytes.

Uses `matplotlib.figure.Figure` with the Agg canvas directly, never pyplot, so it neither
needs a display nor changes the backend a user chose for their own session.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compress.metrics import as_float
from compress.report.tables import add_ratios

logger = logging.getLogger(__name__)

_MEMORY_SERIES: tuple[tuple[str, str], ...] = (
    ("weight_bytes_ratio", "weight bytes"),
    ("saved_bytes_ratio", "saved checkpoint"),
    ("peak_rss_bytes_ratio", "peak RSS"),
    ("model_rss_bytes_ratio", "model RSS (peak - runtime)"),
)


def _ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok"


def _label(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _new_axes(n_variants: int, title: str, ylabel: str) -> tuple[Figure, object]:
    width = min(11.0, max(5.0, 1.1 * n_variants + 2.0))
    fig = Figure(figsize=(width, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="baseline = 1.0")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _finish(fig: Figure, ax: object, names: list[str]) -> bytes:
    ax.set_xticks(range(len(names)))
    rotate = len(names) > 4 or max((len(n) for n in names), default=0) > 12
    ax.set_xticklabels(names, rotation=25 if rotate else 0, ha="right" if rotate else "center")
    ax.margins(y=0.15)
    ax.set_ylim(bottom=0)
    return legend_png(fig)


def legend_png(fig: Figure) -> bytes:
    """The figure as PNG bytes, its legend below the axes (outside them, so it never hides a
    bar or a point whatever the data)."""
    fig.legend(loc="outside lower center", ncols=4, fontsize="small", frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _single_chart(
    rows: list[dict], key: str, title: str, err_key: str | None = None
) -> bytes | None:
    baseline_median = as_float(rows[0].get("latency_ms")) if rows else None
    names: list[str] = []
    heights: list[float] = []
    errors: list[float] = []
    for row in rows:
        value = as_float(row.get(key))
        if not _ok(row) or value is None or math.isinf(value):
            continue
        names.append(str(row.get("variant")))
        heights.append(value)
        if err_key is not None:
            iqr = as_float(row.get(err_key))
            ok = iqr is not None and baseline_median
            # The IQR spans the middle half: draw it as +-IQR/2 around the median ratio.
            errors.append(iqr / baseline_median / 2 if ok else 0.0)
    if not names:
        logger.info("no values for %s: chart skipped", key)
        return None
    fig, ax = _new_axes(len(names), title, "ratio to baseline")
    bars = ax.bar(
        range(len(names)),
        heights,
        yerr=errors if err_key is not None else None,
        capsize=4,
        color="#4C72B0",
        width=0.6,
    )
    ax.bar_label(bars, labels=[_label(h) for h in heights], padding=2, fontsize="small")
    return _finish(fig, ax, names)


def _memory_chart(rows: list[dict]) -> bytes | None:
    kept = [
        row
        for row in rows
        if _ok(row) and any(as_float(row.get(k)) is not None for k, _ in _MEMORY_SERIES)
    ]
    series = [
        (key, label)
        for key, label in _MEMORY_SERIES
        if any(as_float(row.get(key)) is not None for row in kept)
    ]
    if not kept or not series:
        logger.info("no memory ratios: chart skipped")
        return None
    names = [str(row.get("variant")) for row in kept]
    fig, ax = _new_axes(len(names), "Memory relative to baseline", "ratio to baseline")
    width = 0.8 / len(series)
    colors = ("#4C72B0", "#DD8452", "#55A868")
    for i, (key, label) in enumerate(series):
        values = [as_float(row.get(key)) for row in kept]
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(kept))]
        bars = ax.bar(
            xs,
            [math.nan if v is None else v for v in values],
            width=width,
            label=label,
            color=colors[i % len(colors)],
        )
        ax.bar_label(bars, labels=[_label(v) for v in values], padding=2, fontsize="x-small")
    return _finish(fig, ax, names)


def ratio_bar_charts(rows: Sequence[dict]) -> list[tuple[str, bytes]]:
    """PNG bar charts of each variant relative to the baseline (row 0).

    Returns `(title, png_bytes)` pairs: perplexity ratio, latency ratio (IQR / baseline
    median as error bars) and memory ratios (weight bytes, saved checkpoint, peak RSS as
    grouped bars). Failed variants and missing values are left out; a chart with nothing to
    show is skipped. Ratios are recomputed from the raw metrics, so `rows` may or may not
    already carry them.
    """
    rows = add_ratios(rows)
    charts: list[tuple[str, bytes]] = []
    specs = (
        ("Perplexity relative to baseline", "perplexity_ratio", None),
        (
            "Forward latency relative to baseline (median, IQR bars)",
            "latency_ratio",
            "latency_iqr_ms",
        ),
    )
    for title, key, err_key in specs:
        png = _single_chart(rows, key, title, err_key)
        if png is not None:
            charts.append((title, png))
    png = _memory_chart(rows)
    if png is not None:
        charts.append(("Memory relative to baseline", png))
    return charts
