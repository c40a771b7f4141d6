"""One self-contained HTML page per run: no external CSS, JS, fonts or images.

Every user-supplied string is escaped with `html.escape`; the only unescaped input is the
HTML fragments a caller passes in `sections` (build them with `html_table` to stay safe).
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress import atomic
from compress.metrics import as_float
from compress.report.tables import add_ratios
from compress.storage import mask_urls

logger = logging.getLogger(__name__)

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.6em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e4e4e4; text-align: right;
         white-space: nowrap; vertical-align: top; }
th { background: #f4f5f7; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
tr.baseline td { background: #f8fbff; font-weight: 600; }
tr.failed td { background: #fff5f5; }
td.error { color: #a00; text-align: left; white-space: normal; font-family: monospace; }
.stages { color: #666; font-size: 12px; font-weight: normal; white-space: normal; }
.status-ok { color: #176d2c; } .status-failed { color: #a00; font-weight: 600; }
.caption { color: #555; font-size: 12px; margin: 6px 0 0; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; flex: 1 1 480px; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; }
dt { font-weight: 600; } dd { margin: 0; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px; overflow-x: auto;
      font-size: 12px; }
"""

_MB = 1e6


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
            return f"{value:,.1f}"
        return f"{value:.4g}"
    return str(value)


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    x = as_float(value)
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x / scale, fmt)


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
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
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
    "params",
    "sparsity",
)


def _interval(row: dict, key: str, fmt: str) -> str:
    """`` [lo, hi]`` of the 95% interval of ``key`` (``key_lo``/``key_hi``), or nothing."""
    lo, hi = as_float(row.get(f"{key}_lo")), as_float(row.get(f"{key}_hi"))
    return "" if lo is None or hi is None else f" [{lo:{fmt}}, {hi:{fmt}}]"


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
        latency = f"{median:.2f}" + ("" if iqr is None else f" ± {iqr:.2f}")
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
        _num(row.get("weight_bytes"), ".2f", _MB),
        _num(row.get("weight_bytes_ratio"), ".3f"),
        _num(row.get("quantized_layer_bytes_ratio"), ".3f"),
        _num(row.get("saved_bytes"), ".2f", _MB),
        _num(row.get("peak_rss_bytes"), ".1f", _MB),
        _num(row.get("model_rss_bytes"), ".1f", _MB),
        _num(row.get("gpu_peak_bytes"), ".1f", _MB),
        "—" if params is None else f"{params:,.0f}",
        _num(row.get("sparsity"), ".3f"),
    ]


def _summary_table(rows: Sequence[dict]) -> str:
    text_th = '<th class="text">'
    head = "".join(
        f"{text_th if i < 2 else '<th>'}{html.escape(h)}</th>"
        for i, h in enumerate(_SUMMARY_HEADERS)
    )
    body = []
    for i, row in enumerate(rows):
        status = str(row.get("status", ""))
        failed = status != "ok"
        flags = ("baseline" if i == 0 else "", "failed" if failed else "")
        classes = " ".join(c for c in flags if c)
        stages = row.get("stages")
        name = (
            f'<td class="text">{html.escape(str(row.get("variant")))}'
            + (f'<div class="stages">{html.escape(str(stages))}</div>' if stages else "")
            + "</td>"
        )
        status_cell = (
            f'<td class="text status-{"failed" if failed else "ok"}">{html.escape(status)}</td>'
        )
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in _summary_cells(row))
        attr = f' class="{classes}"' if classes else ""
        body.append(f"<tr{attr}>{name}{status_cell}{cells}</tr>")
        if failed:
            error = row.get("error") or "(no error message)"
            body.append(
                f"<tr{attr}><td></td>"
                f'<td class="error" colspan="{len(_SUMMARY_HEADERS) - 1}">'
                f"error: {html.escape(str(error))}</td></tr>"
            )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
        '<p class="caption">Ratios are value / baseline value (first row). Quantized-layer '
        "ratio: weight bytes of the quantized layers / their fp32 size, within the same "
        "variant. MB = 10<sup>6</sup> bytes. — means not measured. [lo, hi]: bootstrap 95% "
        "confidence interval. <b>within noise</b>: the interval of the perplexity's "
        "difference to the baseline (same windows) contains 0. <b>NOISY</b>: the latency "
        "ratio's interval stayed wider than the recipe's target; do not rank by it. <b>vs "
        "control</b>: perplexity minus that of the variant's compute-matched control (the "
        "baseline put through the same training stages, its own row), same windows, with "
        "its paired interval.</p>"
    )


def charts_html(charts: Sequence[tuple[str, bytes]]) -> str:
    """(title, PNG bytes) pairs as figures embedded as data URIs, side by side."""
    figures = []
    for title, png in charts:
        data = base64.b64encode(png).decode("ascii")
        alt = html.escape(title)
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{alt}</figcaption></figure>"
        )
    return f'<div class="charts">{"".join(figures)}</div>'


def render_html(
    rows: Sequence[dict],
    *,
    title: str,
    recipe_text: str,
    definitions: dict[str, str],
    environment: dict[str, str],
    sections: Sequence[tuple[str, str]] = (),
    charts: Sequence[tuple[str, bytes]] = (),
) -> str:
    """The report page as one self-contained HTML string.

    `rows`: one dict per variant, baseline first (ratios are added here if missing).
    `sections`: (heading, HTML fragment) pairs inserted as given after the charts; the
    heading is escaped, the fragment is not. `charts`: (title, PNG bytes) pairs, embedded
    as data URIs.
    """
    rows = add_ratios(rows) if rows and "perplexity_ratio" not in rows[0] else list(rows)
    head = [("Summary", _summary_table(rows))]
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
    return html_page(
        title,
        [*head, *sections],
        recipe_text=recipe_text,
        definitions=definitions,
        environment=environment,
    )


def html_page(
    title: str,
    sections: Sequence[tuple[str, str]],
    *,
    recipe_text: str,
    definitions: Mapping[str, str],
    environment: Mapping[str, str],
) -> str:
    """A self-contained report page: `sections` ((heading, HTML fragment) pairs; the heading
    is escaped, the fragment is not), then the metric definitions, the recipe and the
    environment. Any URL's password on the page is masked."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for heading, fragment in sections:
        parts += [f"<h2>{esc(heading)}</h2>", f'<div class="section">{fragment}</div>']
    if definitions:
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in definitions.items())
        parts += ["<h2>Metric definitions</h2>", f"<dl>{items}</dl>"]
    parts += ["<h2>Recipe</h2>", f"<pre>{esc(recipe_text)}</pre>"]
    if environment:
        env_rows = [{"item": k, "value": v} for k, v in environment.items()]
        parts += ["<h2>Environment</h2>", html_table(env_rows, ["item", "value"])]
    parts.append("</body></html>")
    return mask_urls("\n".join(parts) + "\n")  # a password in the recipe or an error message


def write_html(
    path: str | Path,
    rows: Sequence[dict],
    *,
    title: str,
    recipe_text: str,
    definitions: dict[str, str],
    environment: dict[str, str],
    sections: Sequence[tuple[str, str]] = (),
    charts: Sequence[tuple[str, bytes]] = (),
) -> Path:
    """Write `render_html(...)` to `path` (UTF-8, atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(
        rows,
        title=title,
        recipe_text=recipe_text,
        definitions=definitions,
        environment=environment,
        sections=sections,
        charts=charts,
    )
    atomic.write_text(path, page)
    logger.info("wrote %s", path)
    return path
