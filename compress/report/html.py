"""One self-contained HTML page per run: no external CSS, JS, fonts or images.

Every user-supplied string is escaped with `html.escape`; the only unescaped input is the
HTML fragments a caller passes in `sections` (build them with `html_table` to stay safe).
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress import atomic
from compress.metrics import as_float
from compress.report.plots import inline_svg
from compress.report.tables import add_ratios
from compress.storage import mask_urls

logger = logging.getLogger(__name__)

_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1400px; margin: 0 auto; padding: 16px 24px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; }
a { color: #1a5fb4; }
nav.toc { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 8px 16px; margin: 12px 0; }
nav.toc ol { margin: 4px 0; padding-left: 20px; columns: 2 18em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { padding: 4px 6px; border-bottom: 1px solid #e4e4e4; text-align: right;
         white-space: nowrap; vertical-align: top; }
th { background: #f4f5f7; position: sticky; top: 0; white-space: normal; min-width: 4em; }
table.summary th { max-width: 9em; }
td.text, th.text { text-align: left; }
td.text { white-space: normal; overflow-wrap: break-word; min-width: 6em; }
td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 12em; }
tr.baseline td { background: #f8fbff; font-weight: 600; }
tr.failed td { background: #fff5f5; }
td.error { color: #a00; text-align: left; white-space: normal; font-family: monospace; }
.stages { color: #555; font-size: 12px; font-weight: normal; white-space: normal;
          min-width: 10em; max-width: 20em; }
.noisy { color: #a00; font-weight: 600; }
.ci { display: block; color: #666; font-size: 11px; font-weight: normal; }
.status-ok { color: #176d2c; } .status-failed { color: #a00; font-weight: 600; }
.caption { color: #555; font-size: 12px; margin: 6px 0 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 480px), 1fr));
          gap: 16px; }
figure { margin: 0; min-width: 0; }
figure.wide { grid-column: 1 / -1; }
figure img, figure svg { width: 100%; height: auto; border: 1px solid #eee; display: block; }
figcaption { font-size: 12px; color: #555; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
details > summary { cursor: pointer; color: #1a5fb4; margin: 4px 0; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px; overflow-x: auto;
      font-size: 12px; }
"""

MB = 1e6
"""Bytes in a megabyte (10⁶ bytes), the unit of the reports' MB columns and axes."""


def format_value(value: Any) -> str:
    """A table cell's text (unescaped): '—' for missing, thousands separators for integers,
    about four significant digits for floats."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value != 0 and abs(value) >= 1000:
            return f"{value:,.0f}"
        text = f"{value:.4g}"
        return text if "e" not in text or abs(value) < 1e-4 else f"{value:.6f}".rstrip("0")
    return str(value)


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    x = as_float(value)
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x / scale, fmt)


def _text_class(records: Sequence[dict], column: str) -> str:
    """``class="text"`` (left-aligned) for a column whose first value is not a number."""
    value = next((r.get(column) for r in records if r.get(column) is not None), None)
    return "" if value is None or isinstance(value, (int, float)) else ' class="text"'


def html_table(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """An HTML table of `records`; `columns` defaults to every key in first-seen order.

    Header and cell text are escaped, so the result is safe to pass as a `sections`
    fragment to `render_html`.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for record in records:
            seen.update(dict.fromkeys(record))
        columns = list(seen)
    head = "".join(f"<th{_text_class(records, c)}>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for record in records:
        cells = []
        for c in columns:
            value = record.get(c)
            cls = "" if isinstance(value, (int, float)) or value is None else ' class="text"'
            cells.append(f"<td{cls}>{html.escape(format_value(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


_SUMMARY_HEADERS: tuple[str, ...] = (
    "variant",
    "status",
    "perplexity",
    "ppl ratio",
    "vs control",
    "latency ms (median ± IQR)",
    "latency ratio",
    "weight MB",
    "weight ratio",
    "quantized-layer ratio",
    "saved MB",
    "peak RSS MB",
    "model RSS MB",
    "GPU peak MB",
    "params (M)",
    "sparsity",
)


def _interval(row: dict, key: str, fmt: str) -> str:
    """`` [lo, hi]`` of the 95% interval of ``key`` (``key_lo``/``key_hi``), or nothing."""
    lo, hi = as_float(row.get(f"{key}_lo")), as_float(row.get(f"{key}_hi"))
    return "" if lo is None or hi is None else f" [{lo:{fmt}}, {hi:{fmt}}]"


def _ms(x: float) -> str:
    """Milliseconds to about three significant digits (12.34, 123.4, 1235)."""
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"


def _vs_control(row: dict) -> str:
    """The perplexity minus the compute-matched control's, with its interval, for a variant
    that trains; "control" on a control's own row."""
    if row.get("role") == "control":
        return "control"
    delta = as_float(row.get("ppl_delta_control"))
    if delta is None:
        return "—"
    return (
        f"{delta:+.2f}"
        + _interval(row, "ppl_delta_control", "+.2f")
        + (" (within noise)" if row.get("ppl_control_within_noise") is True else "")
        + f" vs {row.get('control')}"
    )


def _summary_cells(row: dict) -> list[str]:
    median = as_float(row.get("latency_ms"))
    iqr = as_float(row.get("latency_iqr_ms"))
    if median is None:
        latency = "—"
    else:
        latency = _ms(median) + ("" if iqr is None else f" ± {_ms(iqr)}")
    params = as_float(row.get("param_count"))
    return [
        _num(row.get("perplexity"), ".2f") + _interval(row, "perplexity", ".2f"),
        _num(row.get("perplexity_ratio"), ".3f")
        + (" (within noise)" if row.get("ppl_within_noise") is True else ""),
        _vs_control(row),
        latency,
        _num(row.get("latency_ratio"), ".3f")
        + _interval(row, "latency_ratio", ".3f")
        + (" NOISY" if row.get("latency_noisy") is True else ""),
        _num(row.get("weight_bytes"), ".2f", MB),
        _num(row.get("weight_bytes_ratio"), ".3f"),
        _num(row.get("quantized_layer_bytes_ratio"), ".3f"),
        _num(row.get("saved_bytes"), ".2f", MB),
        _num(row.get("peak_rss_bytes"), ".1f", MB),
        _num(row.get("model_rss_bytes"), ".1f", MB),
        _num(row.get("gpu_peak_bytes"), ".1f", MB),
        "—" if params is None else f"{params / 1e6:.3g}",
        _num(row.get("sparsity"), ".3f"),
    ]


def _cell_class(text: str) -> str:
    return ' class="noisy"' if "NOISY" in text else ""


def _cell(text: str) -> str:
    """A summary cell: the value, its interval (if any) on a line of its own below it."""
    body = re.sub(
        r"( \[[^\]]*\]| \(within noise\))",
        r'<span class="ci">\1</span>',
        html.escape(text),
    )
    return f"<td{_cell_class(text)}>{body}</td>"


def _summary_table(rows: Sequence[dict], model_links: Mapping[str, str] | None = None) -> str:
    cells_of = [_summary_cells(row) for row in rows]
    # a column no variant has a value in (GPU memory on a CPU run) is left out
    keep = [j for j in range(len(_SUMMARY_HEADERS) - 2) if any(c[j] != "—" for c in cells_of)]
    headers = [*_SUMMARY_HEADERS[:2], *(_SUMMARY_HEADERS[j + 2] for j in keep)]
    text_th = '<th class="text">'
    head = "".join(
        f"{text_th if i < 2 else '<th>'}{html.escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for i, row in enumerate(rows):
        status = str(row.get("status", ""))
        failed = status != "ok"
        flags = ("baseline" if i == 0 else "", "failed" if failed else "")
        classes = " ".join(c for c in flags if c)
        stages = row.get("stages")
        link = (model_links or {}).get(str(row.get("variant")))
        name = (
            f'<td class="text">{html.escape(str(row.get("variant")))}'
            + (f'<div class="stages">{html.escape(str(stages))}</div>' if stages else "")
            + (
                f'<div class="stages"><a href="{html.escape(link)}">saved model</a></div>'
                if link
                else ""
            )
            + "</td>"
        )
        status_cell = (
            f'<td class="text status-{"failed" if failed else "ok"}">{html.escape(status)}</td>'
        )
        cells = "".join(_cell(cells_of[i][j]) for j in keep)
        attr = f' class="{classes}"' if classes else ""
        body.append(f"<tr{attr}>{name}{status_cell}{cells}</tr>")
        if failed:
            error = row.get("error") or "(no error message)"
            body.append(
                f"<tr{attr}><td></td>"
                f'<td class="error" colspan="{len(headers) - 1}">'
                f"error: {html.escape(str(error))}</td></tr>"
            )
    return (
        f'<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
        '<p class="caption">Ratios are value / baseline value (first row). Quantized-layer '
        "ratio: weight bytes of the quantized layers / their fp32 size, within the same "
        "variant. MB = 10<sup>6</sup> bytes, M = 10<sup>6</sup> parameters. — means not "
        "measured. [lo, hi]: bootstrap 95% "
        "confidence interval. <b>within noise</b>: the interval of the perplexity's "
        "difference to the baseline (same windows) contains 0. <b>NOISY</b>: the latency "
        "ratio's interval stayed wider than the recipe's target; do not rank by it. <b>vs "
        "control</b>: perplexity minus that of the variant's compute-matched control (the "
        "baseline put through the same training stages, its own row), same windows, with "
        "its paired interval.</p>"
    )


def charts_html(charts: Sequence[tuple[str, bytes]], wide: bool = False) -> str:
    """(title, SVG or PNG bytes) pairs as figures side by side (``wide``: one per row): SVG
    inline, PNG as a data URI."""
    figures = []
    cls = ' class="wide"' if wide else ""
    for title, data in charts:
        alt = html.escape(title)
        if data.startswith(PNG_MAGIC):
            encoded = base64.b64encode(data).decode("ascii")
            body = f'<img src="data:image/png;base64,{encoded}" alt="{alt}">'
        else:
            prefix = "f" + hashlib.sha1(data).hexdigest()[:10]  # unique ids per chart on a page
            body = inline_svg(data, prefix).replace(
                "<svg", f'<svg role="img" aria-label="{alt}"', 1
            )
        figures.append(f"<figure{cls}>{body}<figcaption>{alt}</figcaption></figure>")
    return f'<div class="charts">{"".join(figures)}</div>'


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def render_html(
    rows: Sequence[dict],
    *,
    title: str,
    recipe_text: str,
    definitions: dict[str, str],
    environment: dict[str, str],
    sections: Sequence[tuple[str, str]] = (),
    charts: Sequence[tuple[str, bytes]] = (),
    scatter: Sequence[tuple[str, bytes]] = (),
    layers: Sequence[tuple[str, bytes]] = (),
    provenance: Mapping[str, str] | None = None,
    model_links: Mapping[str, str] | None = None,
) -> str:
    """The report page as one self-contained HTML string.

    `rows`: one dict per variant, baseline first (ratios are added here if missing).
    `sections`: (heading, HTML fragment) pairs inserted as given after the charts; the
    heading is escaped, the fragment is not. `charts` (ratios to the baseline), `scatter`
    (perplexity against cost) and `layers` (per-layer charts): (title, SVG or PNG bytes)
    pairs. `provenance`: when, how and where the report was made. `model_links`: variant ->
    the (relative) address of its saved model.
    """
    rows = add_ratios(rows) if rows and "perplexity_ratio" not in rows[0] else list(rows)
    head = [("Summary", _summary_table(rows, model_links))]
    if rows and rows[0].get("baseline_partial"):
        steps = html.escape(str(rows[0]["baseline_partial"]))
        notice = (
            f'<p style="color:#a00;font-weight:bold">The baseline is {steps}'
            ": its training stopped early, so every number here compares against an "
            "undertrained model. Run the recipe again to resume its training, or set "
            "<code>train.partial: accept</code> to keep it.</p>"
        )
        head.insert(0, ("Partial baseline", notice))
    if charts:
        head.append(("Charts", charts_html(charts)))
    if scatter:
        intro = (
            '<p class="caption">Each point a variant; the baseline is the black star, the '
            "dotted lines run through it: down and left of it is better on both axes.</p>"
        )
        head.append(("Perplexity against cost", intro + charts_html(scatter)))
    if layers:
        intro = (
            '<p class="caption">Per linear layer, in model order. Bits per weight: the '
            "layer's stored bytes without its bias (codes, scales, zero points) x 8 / its "
            "weights. Sparsity: weights exactly zero (not countable in 4-bit codes).</p>"
        )
        head.append(("Per-layer sparsity and bits", intro + charts_html(layers)))
    return html_page(
        title,
        [*head, *sections],
        recipe_text=recipe_text,
        definitions=definitions,
        environment=environment,
        provenance=provenance,
    )


def _anchor(heading: str, used: set[str]) -> str:
    """A unique id for a section from its heading: lowercase words joined by '-'."""
    base = "sec-" + (re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section")
    anchor, n = base, 2
    while anchor in used:
        anchor, n = f"{base}-{n}", n + 1
    used.add(anchor)
    return anchor


def html_page(
    title: str,
    sections: Sequence[tuple[str, str]],
    *,
    recipe_text: str,
    definitions: Mapping[str, str],
    environment: Mapping[str, str],
    provenance: Mapping[str, str] | None = None,
) -> str:
    """A self-contained report page: a table of contents, `sections` ((heading, HTML
    fragment) pairs; the heading is escaped, the fragment is not), then the metric
    definitions, the recipe as written, the provenance and the environment. Any URL's
    password on the page is masked."""
    esc = html.escape
    blocks: list[tuple[str, str]] = list(sections)
    if definitions:
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in definitions.items())
        fold = f"<details><summary>{len(definitions)} metrics: what each one measures</summary>"
        blocks.append(("Metric definitions", f"{fold}<dl>{items}</dl></details>"))
    blocks.append(("Recipe", f"<pre>{esc(recipe_text)}</pre>"))
    if provenance:
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in provenance.items())
        blocks.append(("Provenance", f"<dl>{items}</dl>"))
    if environment:
        env_rows = [{"item": k, "value": v} for k, v in environment.items()]
        blocks.append(("Environment", html_table(env_rows, ["item", "value"])))
    used: set[str] = set()
    anchors = [_anchor(heading, used) for heading, _ in blocks]
    toc = "".join(
        f'<li><a href="#{a}">{esc(heading)}</a></li>' for a, (heading, _) in zip(anchors, blocks)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<nav class="toc" aria-label="Contents"><b>Contents</b><ol>{toc}</ol></nav>',
    ]
    for anchor, (heading, fragment) in zip(anchors, blocks):
        parts.append(f'<h2 id="{anchor}">{esc(heading)}</h2>')
        parts.append(f'<div class="section">{fragment}</div>')
    parts.append("</body></html>")
    return mask_urls("\n".join(parts) + "\n")  # a password in the recipe or an error message


def write_html(path: str | Path, rows: Sequence[dict], **kwargs) -> Path:
    """Write `render_html(rows, **kwargs)` to `path` (UTF-8, atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(rows, **kwargs)
    atomic.write_text(path, page)
    logger.info("wrote %s", path)
    return path
