"""Charts of a run's variants against the baseline, rendered to SVG (or PNG) bytes.

Uses `matplotlib.figure.Figure` with the Agg canvas directly, never pyplot, so it neither
needs a display nor changes the backend a user chose for their own session. Charts are SVG
with text kept as text, so they stay crisp at any width; variants run down the vertical axis,
one row each, so names and value labels never collide however many variants there are.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from compress.metrics import as_float
from compress.report.describe import number
from compress.report.tables import add_ratios

logger = logging.getLogger(__name__)

COLORS: tuple[str, ...] = (
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
)
"""Distinct colours (seaborn's "deep"), one per series."""
NOISY = "#C44E52"
BASELINE = "#222222"

_MEMORY_SERIES: tuple[tuple[str, str], ...] = (
    ("weight_bytes_ratio", "weight bytes"),
    ("saved_bytes_ratio", "saved checkpoint"),
    ("peak_rss_bytes_ratio", "peak RSS"),
    ("model_rss_bytes_ratio", "model RSS (peak - runtime)"),
)
_RATIO_CLIP = 20.0  # a latency ratio beyond [1/20, 20] is drawn at the edge, its value written
_MAX_LAYER_ROWS = 48  # more linear layers than this are summed per block


def _ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok"


def _svg_rc() -> dict:
    return {"svg.fonttype": "none", "svg.hashsalt": "compress", "font.family": "DejaVu Sans"}


def svg_bytes(fig: Figure, legend: bool = False) -> bytes:
    """The figure as SVG bytes (text as text), its legend below the axes if asked."""
    if legend:
        _legend_below(fig)
    buf = io.BytesIO()
    with mpl.rc_context(_svg_rc()):
        fig.savefig(buf, format="svg")
    return buf.getvalue()


def _legend_below(fig: Figure) -> None:
    handles, labels = [], []
    for ax in fig.axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ncols = min(4, len(handles))
        place = {"loc": "outside lower center", "ncols": ncols, "frameon": False}
        fig.legend(handles, labels, fontsize="small", **place)


def legend_svg(fig: Figure) -> bytes:
    """The figure as SVG bytes (text as text, sharp at any size), its legend below the axes
    (outside them, so it never hides a bar or a point whatever the data)."""
    fig.legend(loc="outside lower center", ncols=4, fontsize="small", frameon=False)
    buf = io.BytesIO()
    with mpl.rc_context(_svg_rc()):
        fig.savefig(buf, format="svg")
    return buf.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rows_height(n: int, extra: float = 1.3) -> float:
    return extra + 0.38 * max(n, 1)


def _variant_axis(ax, names: Sequence[str]) -> None:
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first row (the baseline) on top
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _interval(row: dict, key: str, scale: float = 1.0) -> tuple[float, float] | None:
    lo, hi = as_float(row.get(f"{key}_lo")), as_float(row.get(f"{key}_hi"))
    if lo is None or hi is None:
        return None
    return lo / scale, hi / scale


def perplexity_chart(rows: list[dict]) -> bytes | None:
    """Perplexity / the baseline's per variant, with its 95% interval where measured."""
    base = as_float(rows[0].get("perplexity")) if rows else None
    kept = [r for r in rows if _ok(r) and as_float(r.get("perplexity_ratio")) is not None]
    if not kept or not base:
        return None
    names = [str(r["variant"]) for r in kept]
    fig = _figure(6.4, _rows_height(len(kept)))
    ax = fig.add_subplot()
    ax.set_title("Perplexity relative to baseline (lower is better)", fontsize="medium")
    ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
    for i, r in enumerate(kept):
        x = as_float(r["perplexity_ratio"])
        ci = _interval(r, "perplexity", base)
        err = None if ci is None else [[max(0.0, x - ci[0])], [max(0.0, ci[1] - x)]]
        color = BASELINE if i == 0 else COLORS[0]
        ax.errorbar([x], [i], xerr=err, fmt="o", color=color, capsize=3, ms=6)
        note = " (within noise)" if r.get("ppl_within_noise") is True and i else ""
        ax.annotate(
            f"{x:.3f}{note}",
            (ci[1] if ci else x, i),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
        )
    _variant_axis(ax, names)
    ax.set_xlabel("perplexity / baseline perplexity (bars: 95% interval)")
    ax.margins(x=0.25)
    return svg_bytes(fig)


def latency_chart(rows: list[dict]) -> bytes | None:
    """The paired latency ratio per variant with its 95% interval, on a log scale (a ratio
    beyond [1/20, 20] is drawn at the edge with its value written); noisy ratios in red."""
    kept = [r for r in rows if _ok(r) and as_float(r.get("latency_ratio")) is not None]
    if not kept:
        return None
    names = [str(r["variant"]) for r in kept]
    fig = _figure(6.4, _rows_height(len(kept)))
    ax = fig.add_subplot()
    ax.set_title("Forward latency relative to baseline (lower is faster)", fontsize="medium")
    ax.set_xscale("log")
    ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
    lo_clip, hi_clip = 1 / _RATIO_CLIP, _RATIO_CLIP
    xs: list[float] = []
    any_noisy = False
    for i, r in enumerate(kept):
        x = as_float(r["latency_ratio"])
        noisy = r.get("latency_noisy") is True
        any_noisy |= noisy
        color = NOISY if noisy else (BASELINE if i == 0 else COLORS[0])
        shown = min(max(x, lo_clip), hi_clip)
        ci = _interval(r, "latency_ratio")
        err = None
        if ci is not None and x == shown:
            lo, hi = max(ci[0], lo_clip), min(ci[1], hi_clip)
            err = [[max(0.0, x - lo)], [max(0.0, hi - x)]]
        marker = "o" if x == shown else (">" if x > hi_clip else "<")
        ax.errorbar([shown], [i], xerr=err, fmt=marker, color=color, capsize=3, ms=6)
        xs += [shown, *(ci if ci else ())]
        label = f"{x:.2f}×" + (" NOISY" if noisy else "") + (" (off scale)" if x != shown else "")
        ax.annotate(
            label,
            (min(max(ci[1], lo_clip), hi_clip) if ci and x == shown else shown, i),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
            color=color if noisy else "black",
        )
    finite = [v for v in xs if v > 0 and math.isfinite(v)]
    low, high = min([*finite, 1.0]), max([*finite, 1.0])
    ax.set_xlim(max(low / 1.3, lo_clip / 1.1), min(high * 3.0, hi_clip * 3.0))  # room for labels
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{number(v, 2)}×"))
    ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    _variant_axis(ax, names)
    ax.set_xlabel(
        "variant / baseline, in alternating rounds\n(log scale; bars: 95% interval)"
        + ("\nred: NOISY, do not rank by it" if any_noisy else "")
    )
    return svg_bytes(fig)


def memory_chart(rows: list[dict]) -> bytes | None:
    """Memory ratios (weight bytes, saved checkpoint, peak RSS, model RSS) per variant as
    grouped horizontal bars, each series its own colour and every bar labelled."""
    kept = [
        r for r in rows if _ok(r) and any(as_float(r.get(k)) is not None for k, _ in _MEMORY_SERIES)
    ]
    series = [
        (key, label)
        for key, label in _MEMORY_SERIES
        if any(as_float(r.get(key)) is not None for r in kept)
    ]
    if not kept or not series:
        return None
    names = [str(r["variant"]) for r in kept]
    per = len(series)
    fig = _figure(6.4, 1.6 + 0.17 * per * len(kept))
    ax = fig.add_subplot()
    ax.set_title("Memory relative to baseline (lower is smaller)", fontsize="medium")
    ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
    height = 0.8 / per
    top = 0.0
    for j, (key, label) in enumerate(series):
        values = [as_float(r.get(key)) for r in kept]
        ys = [i + (j - (per - 1) / 2) * height for i in range(len(kept))]
        bars = ax.barh(
            ys,
            [math.nan if v is None else v for v in values],
            height=height * 0.9,
            label=label,
            color=COLORS[j % len(COLORS)],
        )
        ax.bar_label(
            bars,
            labels=["" if v is None else f"{v:.2f}" for v in values],
            padding=2,
            fontsize="x-small",
        )
        top = max([top, *(v for v in values if v is not None)])
    _variant_axis(ax, names)
    ax.set_xlim(0, max(top, 1.0) * 1.18)
    ax.set_xlabel("variant / baseline")
    return svg_bytes(fig, legend=True)


def _overlaps(box: Bbox, others: Sequence[Bbox]) -> float:
    total = 0.0
    for o in others:
        w = min(box.x1, o.x1) - max(box.x0, o.x0)
        h = min(box.y1, o.y1) - max(box.y0, o.y0)
        if w > 0 and h > 0:
            total += w * h
    return total


_OFFSETS: tuple[tuple[int, int, str, str], ...] = (
    (7, 5, "left", "bottom"),
    (7, -5, "left", "top"),
    (-7, 5, "right", "bottom"),
    (-7, -5, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (10, 0, "left", "center"),
    (-10, 0, "right", "center"),
    (18, 16, "left", "bottom"),
    (-18, -16, "right", "top"),
    (18, -16, "left", "top"),
    (-18, 16, "right", "bottom"),
)


def place_labels(
    ax,
    points: Sequence[tuple[float, float]],
    labels: Sequence[str],
    radii: Sequence[float] | None = None,
) -> list[Bbox]:
    """Annotate each point with its label at the first of a few offsets where the label
    overlaps no other label, no point and stays inside the axes (the least overlapping one if
    none is free), so labels do not overprint. Call after the axes' limits are final.
    Returns the labels' boxes (display coordinates)."""
    fig = ax.figure
    fig.canvas.draw()  # settle the layout: positions in display space are final from here
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = []  # each point's marker, ``radii`` pixels around it (6 unless given)
    for (x, y), r in zip(points, radii or [6.0] * len(points)):
        px, py = ax.transData.transform((x, y))
        marks.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    placed: list[Bbox] = []
    for (x, y), text in zip(points, labels):
        best = None
        for dx, dy, ha, va in _OFFSETS:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize="small",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if abs(dx) > 10 else None,
            )
            ann.set_in_layout(False)
            box = ann.get_window_extent(renderer).padded(1)
            outside = (
                box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1
            )
            cost = _overlaps(box, placed) + _overlaps(box, marks) + (1e6 if outside else 0)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])
    return placed


def _scatter(
    rows: list[dict], x_key: str, title: str, xlabel: str, x_scale: float = 1.0, log_x: bool = False
) -> bytes | None:
    kept = [
        r
        for r in rows
        if _ok(r) and as_float(r.get(x_key)) is not None and as_float(r.get("perplexity"))
    ]
    if len(kept) < 2:
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize="medium")
    points: list[tuple[float, float]] = []
    for i, r in enumerate(kept):
        x = as_float(r[x_key]) / x_scale
        y = as_float(r["perplexity"])
        ci_x = _interval(r, x_key, x_scale)
        ci_y = _interval(r, "perplexity")
        xerr = None if ci_x is None else [[max(0.0, x - ci_x[0])], [max(0.0, ci_x[1] - x)]]
        yerr = None if ci_y is None else [[max(0.0, y - ci_y[0])], [max(0.0, ci_y[1] - y)]]
        is_base = r is rows[0]
        noisy = r.get("latency_noisy") is True and x_key == "latency_ratio"
        ax.errorbar(
            [x],
            [y],
            xerr=xerr,
            yerr=yerr,
            fmt="*" if is_base else "o",
            ms=13 if is_base else 6,
            color=BASELINE if is_base else (NOISY if noisy else COLORS[i % len(COLORS)]),
            ecolor="0.6",
            elinewidth=0.8,
            capsize=2,
            label="baseline" if is_base else None,
            zorder=3,
        )
        points.append((x, y))
    if kept[0] is rows[0]:
        ax.axhline(points[0][1], color="0.5", linestyle=":", linewidth=1)
        ax.axvline(points[0][0], color="0.5", linestyle=":", linewidth=1)
    if log_x:  # a ratio: one slow outlier does not squash the rest against the axis
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{number(v, 2)}×"))
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    labels = [
        str(r["variant"])
        + (" (noisy)" if r.get("latency_noisy") is True and x_key == "latency_ratio" else "")
        for r in kept
    ]
    place_labels(ax, points, labels, [12.0 if r is rows[0] else 6.0 for r in kept])
    return svg_bytes(fig, legend=True)


def scatter_charts(rows: Sequence[dict]) -> list[tuple[str, bytes]]:
    """Perplexity against the latency ratio and against the weight size, the baseline a star
    with dotted lines through it, every point labelled without overprinting."""
    rows = add_ratios(rows)
    out = []
    specs = (
        (
            "latency_ratio",
            "Perplexity vs latency",
            "latency / baseline (paired, log scale; bars: 95% interval)",
            1.0,
            True,
        ),
        ("weight_bytes", "Perplexity vs weight size", "weight MB (10^6 bytes)", 1e6, False),
    )
    for key, title, xlabel, scale, log_x in specs:
        svg = _scatter(rows, key, title, xlabel, scale, log_x)
        if svg is not None:
            out.append((title, svg))
    return out


def ratio_bar_charts(rows: Sequence[dict]) -> list[tuple[str, bytes]]:
    """Charts of each variant relative to the baseline (row 0), as ``(title, svg_bytes)``:
    perplexity ratio and latency ratio with their 95% intervals, and the memory ratios as
    grouped bars. Failed variants and missing values are left out; a chart with nothing to
    show is skipped. Ratios are recomputed from the raw metrics, so `rows` may or may not
    already carry them.
    """
    rows = add_ratios(rows)
    charts: list[tuple[str, bytes]] = []
    for title, make in (
        ("Perplexity relative to baseline", perplexity_chart),
        ("Forward latency relative to baseline", latency_chart),
        ("Memory relative to baseline", memory_chart),
    ):
        svg = make(rows)
        if svg is None:
            logger.info("%s: nothing to show, chart skipped", title)
        else:
            charts.append((title, svg))
    return charts


def _block_of(module: str) -> str:
    """``blocks.3.attn.q_proj`` -> ``blocks.3``: the name up to its first numeric part."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def _grouped(layers: Sequence[dict]) -> list[dict]:
    """Per-layer records summed per block (sparsity and bits recomputed from the sums)."""
    groups: dict[str, dict] = {}
    for r in layers:
        g = groups.setdefault(_block_of(r["module"]), {"weights": 0, "zeros": 0, "weight_bytes": 0})
        g["weights"] += r["weights"]
        g["weight_bytes"] += r["weight_bytes"]
        g["zeros"] = None if g["zeros"] is None or r["zeros"] is None else g["zeros"] + r["zeros"]
    out = []
    for name, g in groups.items():
        n = g["weights"]
        out.append(
            {
                "module": name,
                "sparsity": None if g["zeros"] is None or not n else g["zeros"] / n,
                "bits_per_weight": 8 * g["weight_bytes"] / n if n else None,
            }
        )
    return out


def layer_charts(layers: Mapping[str, Sequence[dict] | None]) -> list[tuple[str, bytes]]:
    """Per-layer sparsity and bits per weight, one line per variant (``variant -> the records
    of :func:`compress.evaluate.layers.layer_stats`), layers in model order along the x axis;
    summed per block when a model has more than a few dozen linear layers."""
    present = {name: list(recs) for name, recs in layers.items() if recs}
    if not present:
        return []
    first = next(iter(present.values()))
    grouped = len(first) > _MAX_LAYER_ROWS
    data = {name: (_grouped(recs) if grouped else recs) for name, recs in present.items()}
    out = []
    for key, title, ylabel in (
        ("sparsity", "Sparsity per layer", "fraction of weights that are zero"),
        ("bits_per_weight", "Bits per weight per layer", "stored bits / weight"),
    ):
        if not any(r.get(key) is not None for recs in data.values() for r in recs):
            continue
        modules = [r["module"] for r in next(iter(data.values()))]
        fig = _figure(6.4, 4.2)
        ax = fig.add_subplot()
        ax.set_title(title + (" (summed per block)" if grouped else ""), fontsize="medium")
        for i, (name, recs) in enumerate(data.items()):
            index = {r["module"]: r.get(key) for r in recs}
            ys = [index.get(m) for m in modules]
            ax.plot(
                range(len(modules)),
                [math.nan if v is None else v for v in ys],
                marker="o",
                ms=4,
                lw=1.4,
                color=BASELINE if name == "baseline" else COLORS[i % len(COLORS)],
                linestyle="--" if name == "baseline" else "-",
                label=name,
            )
        ax.set_xticks(range(len(modules)))
        ax.set_xticklabels(modules, rotation=90, fontsize="x-small")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key == "sparsity":
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.set_ylim(bottom=0)
        out.append((title, svg_bytes(fig, legend=True)))
    return out


_ID = re.compile(r'\bid="([^"]+)"')


def inline_svg(svg: bytes, prefix: str) -> str:
    """SVG bytes as an element to place in HTML: the XML prolog dropped, every id (and each
    reference to it) prefixed so that several charts on one page never share an id, and the
    size left to the page (it scales to its container's width)."""
    text = svg.decode("utf-8")
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)  # HTML gives inline SVG its namespace
    ids = set(_ID.findall(text))
    for old in sorted(ids, key=len, reverse=True):
        new = f"{prefix}-{old}"
        text = text.replace(f'id="{old}"', f'id="{new}"')
        text = text.replace(f"#{old})", f"#{new})").replace(f'"#{old}"', f'"#{new}"')
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r"<svg\1", text, count=1)
    return text
