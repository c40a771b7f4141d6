"""Ratios to the baseline, and the tidy CSV/JSON files a run writes.

A row is a flat dict describing one variant; row 0 is always the baseline. Nothing here
measures anything: it only arranges numbers that were measured elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from compress import atomic
from compress.metrics import CATALOG, QUANTIZED_RATIO, RATIO_OF, SHORTFALL_OF, ratios
from compress.storage import mask_urls

logger = logging.getLogger(__name__)

RATIO_METRICS: tuple[str, ...] = RATIO_OF
"""Metrics divided by the baseline's (row 0) value to give `<metric>_ratio`. The latency ratio
is not among them: it is measured paired (variant and baseline in alternating rounds) and
arrives in the row as `latency_ratio`."""


def _column_order() -> tuple[str, ...]:
    """Each metric of the catalog followed by its ratio (the quantized-layer ratio next to the
    quantized-layer bytes)."""
    out: list[str] = []
    for m in CATALOG:
        out.append(m.key)
        if m.key in RATIO_OF:
            out.append(f"{m.key}_ratio")
        if m.key == "quantized_layer_bytes":
            out.append(QUANTIZED_RATIO)
        if m.key in SHORTFALL_OF:
            out.append(f"{m.key}_shortfall")
    return tuple(out)


METRIC_COLUMNS: tuple[str, ...] = _column_order()
"""Every metric key, measured and ratio, in the column order of CSVs and tables."""


def add_ratios(rows: Sequence[dict]) -> list[dict]:
    """New row dicts with `<metric>_ratio` = value / baseline value (row 0) for every metric of
    `RATIO_METRICS`, and `quantized_layer_bytes_ratio` within each row
    (:func:`compress.metrics.ratios`). A ratio is None where a value is missing (None/NaN) or
    the denominator is 0. The input rows are not modified."""
    if not rows:
        return []
    return [{**row, **ratios(row, rows[0])} for row in rows]


def ordered_columns(rows: Sequence[dict]) -> list[str]:
    """Columns for a table of `rows`: `variant, status`, then each metric followed by its
    ratio, then every other key in first-seen order, `error` last. Only keys present in at
    least one row are listed."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    head: list[str] = ["variant", "status", *METRIC_COLUMNS]
    cols = [c for c in head if c in seen]
    cols += [c for c in seen if c not in cols and c != "error"]
    if "error" in seen:
        cols.append("error")
    return cols


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write one CSV line per row, in the given order (a run's: baseline first), atomically,
    with any URL's password masked.

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
    atomic.write_text(path, mask_urls(frame.to_csv(index=False)))
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
    """Write `{"meta": meta, "rows": rows}` with indent 2, atomically; NaN and inf are written
    as null, any URL's password masked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": jsonable(meta), "rows": [jsonable(row) for row in rows]}
    atomic.write_text(path, mask_urls(json.dumps(doc, indent=2, allow_nan=False) + "\n"))
    logger.info("wrote %s (%d rows)", path, len(rows))
    return path
