"""Ratios to the baseline, and the tidy CSV/JSON files a run writes.

A row is a flat dict describing one variant; row 0 is always the baseline. Nothing here
measures anything: it only arranges numbers that were measured elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

RATIO_METRICS: tuple[str, ...] = (
    "perplexity",
    "weight_bytes",
    "saved_bytes",
    "peak_rss_bytes",
    "model_rss_bytes",
    "params",
)
"""Metrics divided by the baseline's (row 0) value to give `<metric>_ratio`. The latency ratio
is not among them: it is measured paired (variant and baseline in alternating rounds) and
arrives in the row as `latency_ms_median_ratio`."""

QUANTIZED_RATIO = "quantized_layer_bytes_ratio"
"""Bytes of the quantized layers relative to their fp32 size, within the same row."""

# Column order of the CSV: each metric followed by its ratio, the quantized-layer bytes
# next to the weight bytes they are part of.
_METRIC_ORDER: tuple[str, ...] = (
    "perplexity",
    "latency_ms_median",
    "weight_bytes",
    "quantized_layer_bytes",
    "saved_bytes",
    "peak_rss_bytes",
    "model_rss_bytes",
    "params",
)


def as_float(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, not a number, or NaN."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def ratio(num: Any, den: Any) -> float | None:
    """num / den as a float; None when either is missing (None/NaN) or den is 0."""
    a, b = as_float(num), as_float(den)
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(rows: Sequence[dict], metrics: Iterable[str] = RATIO_METRICS) -> list[dict]:
    """New row dicts with `<metric>_ratio` = value / baseline value (row 0).

    A ratio is None where the value or the baseline value is missing (None/NaN) or the
    baseline value is 0. Each row also gets `quantized_layer_bytes_ratio` =
    `quantized_layer_bytes / quantized_layer_fp32_bytes` of that same row (None when the
    denominator is 0 or missing). The input rows are not modified.
    """
    metrics = tuple(metrics)
    if not rows:
        return []
    baseline = rows[0]
    out: list[dict] = []
    for row in rows:
        new = dict(row)
        for metric in metrics:
            new[f"{metric}_ratio"] = ratio(row.get(metric), baseline.get(metric))
        new[QUANTIZED_RATIO] = ratio(
            row.get("quantized_layer_bytes"), row.get("quantized_layer_fp32_bytes")
        )
        out.append(new)
    return out


def ordered_columns(rows: Sequence[dict]) -> list[str]:
    """Columns for a table of `rows`: `variant, status`, then each metric followed by its
    ratio, then every other key in first-seen order, `error` last. Only keys present in at
    least one row are listed."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    head: list[str] = ["variant", "status"]
    for metric in _METRIC_ORDER:
        head += [metric, f"{metric}_ratio"]
    cols = [c for c in head if c in seen]
    cols += [c for c in seen if c not in cols and c != "error"]
    if "error" in seen:
        cols.append("error")
    return cols


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write one CSV line per row, in the given order (a run's: baseline first).

    Missing values are written as empty cells; integers stay integers. `columns` defaults to
    `ordered_columns(rows)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        [jsonable(row) for row in rows],
        columns=list(columns) if columns is not None else ordered_columns(rows),
        dtype=object,
    )
    frame.to_csv(path, index=False)
    logger.info("wrote %s (%d rows)", path, len(frame))
    return path


def jsonable(value: Any) -> Any:
    """`value` made strictly JSON-serialisable: NaN/inf become None, numpy scalars become
    Python numbers, tuples/sets become lists, paths and other objects become strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def write_json(path: str | Path, rows: Sequence[dict], meta: dict) -> Path:
    """Write `{"meta": meta, "rows": rows}` with indent 2; NaN and inf are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": jsonable(meta), "rows": [jsonable(row) for row in rows]}
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("wrote %s (%d rows)", path, len(rows))
    return path
