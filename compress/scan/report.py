"""The scan's files: ``scan.csv`` (one row per layer and setting), ``scan.json`` (the same
with the run's context) and ``scan.html``, a self-contained page with the heat map (layers x
settings, SVG) and the ranking."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from compress import atomic
from compress.scan.measure import ScanResult

COLUMNS = [
    "layer",
    "block",
    "numel",
    "setting",
    "kind",
    "method",
    "value",
    "simulated",
    "perplexity",
    "delta",
    "delta_lo",
    "delta_hi",
    "ratio",
]


def _csv(result: ScanResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "baseline_perplexity"], lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow(
            {**{k: r[k] for k in COLUMNS}, "baseline_perplexity": result.baseline_perplexity}
        )
    return buf.getvalue()


def _color(ratio: float, top: float) -> str:
    """White (no change) to dark red (the largest increase), on a log scale; blue below 1."""
    if not math.isfinite(ratio):
        return "#000000"
    x = math.log(max(ratio, 1e-9))
    if x < 0:
        t = min(1.0, -x / max(math.log(top), 1e-9))
        return f"rgb({int(255 - 120 * t)},{int(255 - 80 * t)},255)"
    t = min(1.0, x / max(math.log(top), 1e-9))
    return f"rgb({int(255 - 75 * t)},{int(255 - 235 * t)},{int(255 - 235 * t)})"


def heatmap_svg(result: ScanResult) -> str:
    """Layers (rows) x settings (columns), each cell coloured by its perplexity ratio and
    labelled with the perplexity change."""
    longest_setting = max((len(x) for x in result.settings), default=10)
    longest_layer = max((len(x) for x in result.layers), default=10)
    cell_w, cell_h, top_pad = max(90, 7 * longest_setting), 22, 60
    left = 12 + 7 * longest_layer
    ratios = [r["ratio"] for r in result.rows if math.isfinite(r["ratio"])]
    top = max([max(ratios, default=1.0), 1.0 / min(ratios, default=1.0), 1.0001])
    by = {(r["layer"], r["setting"]): r for r in result.rows}
    width = left + cell_w * len(result.settings) + 10
    height = top_pad + cell_h * len(result.layers) + 10
    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11" role="img" '
        f'aria-label="perplexity change per layer and setting">'
    ]
    for j, s in enumerate(result.settings):
        x = left + j * cell_w + cell_w / 2
        out.append(f'<text x="{x}" y="{top_pad - 8}" text-anchor="middle">{esc(s)}</text>')
    for i, layer in enumerate(result.layers):
        y = top_pad + i * cell_h
        out.append(
            f'<text x="{left - 6}" y="{y + cell_h / 2 + 4}" text-anchor="end">{esc(layer)}</text>'
        )
        for j, s in enumerate(result.settings):
            r = by.get((layer, s))
            if r is None:
                continue
            x = left + j * cell_w
            fill = _color(r["ratio"], top)
            dark = math.isfinite(r["ratio"]) and r["ratio"] > math.sqrt(top)
            text = "#ffffff" if dark or not math.isfinite(r["ratio"]) else "#000000"
            out.append(
                f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" '
                f'fill="{fill}"><title>{esc(layer)} / {esc(s)}: perplexity '
                f"{r['perplexity']:.3f} ({r['delta']:+.3f}, 95% interval "
                f"[{r['delta_lo']:+.3f}, {r['delta_hi']:+.3f}])</title></rect>"
            )
            out.append(
                f'<text x="{x + cell_w / 2}" y="{y + cell_h / 2 + 4}" text-anchor="middle" '
                f'fill="{text}">{_delta_text(r)}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def _delta_text(row: dict) -> str:
    """The increase, with ``~`` when its interval contains 0 (within noise)."""
    noise = row["delta_lo"] <= 0 <= row["delta_hi"]
    return f"{row['delta']:+.3f}" + ("~" if noise else "")


def _ranking_table(result: ScanResult) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(s)}</th>" for s in result.settings)
    rows = []
    mean = {
        n: sum(result.delta(n, s) for s in result.settings) / len(result.settings)
        for n in result.layers
    }
    cols = result.prune_settings()
    at = cols[len(cols) // 2]["sparsity"] if cols else None
    per = result.per_weight(at) if at is not None else {}
    if at is not None:
        head += f"<th>per 1,000 pruned weights at {at:g}</th>"
    for n in sorted(result.layers, key=lambda n: -mean[n]):
        by = {r["setting"]: r for r in result.rows if r["layer"] == n}
        cells = "".join(f"<td>{_delta_text(by[s])}</td>" for s in result.settings)
        if at is not None:
            cells += f"<td>{1000 * per[n]:+.3f}</td>"
        rows.append(f"<tr><td>{esc(n)}</td><td>{result.numel[n]:,}</td>{cells}</tr>")
    return f"<table><tr><th>layer</th><th>weights</th>{head}</tr>{''.join(rows)}</table>"


def _intro(result: ScanResult) -> str:
    esc = html.escape
    return (
        f"<p>Perplexity of the first {result.tokens:,} scored tokens of the {esc(result.split)} "
        f"split (windows of {result.seq_len}) when only one linear layer is compressed, the "
        f"rest of the model untouched. Baseline: {result.baseline_perplexity:.3f}. Each cell "
        "shows the change from the baseline; colour is the ratio on a log scale (white: no "
        "change, red: the largest increase, blue: a decrease); ~ marks a change whose paired "
        "bootstrap 95% interval over the scanned windows contains 0 (within noise). "
        "Quantization columns marked "
        "(simulated) round weights in float32 on a min-max grid; they measure what rounding "
        "costs, not a kernel.</p>"
    )


RANKING_NOTE = (
    "<p>The last column is what the scan allocations rank layers by: the increase when "
    "the layer alone is pruned, per weight pruned (interpolated between the scanned "
    "sparsities). Every allocation prunes the same number of weights, so a large layer "
    "with a large increase can still be the cheapest place to prune.</p>"
)


def scan_section(result: ScanResult, notes: list[str] = ()) -> str:
    """The heat map and the ranking as one fragment, for a run's report."""
    esc = html.escape
    return (
        "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
        + _intro(result)
        + heatmap_svg(result)
        + "<h3>Layers, most sensitive first (mean change over the settings)</h3>"
        + RANKING_NOTE
        + _ranking_table(result)
    )


def scan_html(result: ScanResult, title: str, notes: list[str]) -> str:
    esc = html.escape
    note_html = "".join(f"<p>{esc(n)}</p>" for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}td:first-child{text-align:left}</style></head><body>"
        f"<h1>{esc(title)}</h1>{_intro(result)}{note_html}<h2>Heat map</h2>"
        f"{heatmap_svg(result)}"
        "<h2>Layers, most sensitive first (mean change over the settings)</h2>"
        f"{RANKING_NOTE}{_ranking_table(result)}</body></html>\n"
    )


def noise_notes(result: ScanResult) -> list[str]:
    """The scan's warnings: each pruning column where most layers' increases are noise."""
    notes = (result.noise_note(c["sparsity"]) for c in result.prune_settings())
    return list(dict.fromkeys(n for n in notes if n))


def write_scan(out_dir: Path, result: ScanResult, name: str, meta: dict) -> dict[str, Path]:
    """Write scan.csv, scan.json and scan.html into ``out_dir`` (each atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"scan.{k}" for k in ("csv", "json", "html")}
    notes = [
        *noise_notes(result),
        *(f"{k}: {v}" for k, v in meta.items() if k in ("model", "baseline key", "cache")),
    ]
    atomic.write_text(paths["csv"], _csv(result))
    atomic.write_text(
        paths["json"], json.dumps({**meta, "scan": result.to_dict()}, indent=1, default=str)
    )
    atomic.write_text(paths["html"], scan_html(result, f"{name}: per-layer sensitivity", notes))
    return paths
