"""Turn already-measured rows (one per variant, baseline first) into a run's report files.

`write_report` writes `results.csv`, `results.json`, `report.html` and `study.db` into one
directory. Nothing here measures anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from compress.report.html import html_table, render_html, write_html
from compress.report.plots import layer_charts, ratio_bar_charts, scatter_charts
from compress.report.provenance import provenance
from compress.report.study import dashboard_command, sqlite_url, write_study
from compress.report.sweep import (
    pareto_front,
    pareto_trials,
    recommend,
    seed_comparison,
    write_sweep_report,
)
from compress.report.tables import RATIO_METRICS, add_ratios, write_csv, write_json
from compress.storage import STUDY_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "RATIO_METRICS",
    "add_ratios",
    "dashboard_command",
    "html_table",
    "pareto_front",
    "pareto_trials",
    "ratio_bar_charts",
    "recommend",
    "render_html",
    "seed_comparison",
    "sqlite_url",
    "write_csv",
    "write_html",
    "write_json",
    "write_report",
    "write_study",
    "write_sweep_report",
]


def write_report(
    out_dir: Path,
    rows: Sequence[dict],
    *,
    name: str,
    recipe_text: str,
    meta: dict,
    definitions: dict[str, str],
    environment: dict[str, str],
    sections: Sequence[tuple[str, str]] = (),
    provenance_info: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write a run's report into `out_dir` (created if needed) and return the file paths.

    `meta["variants"][name]["layers"]`, where present, gives the per-layer charts; a saved
    model under `out_dir/variants/<name>/` is linked from its row. `provenance_info`
    defaults to this process's (:func:`compress.report.provenance.provenance`).

    Keys of the result: "csv", "json", "html", "study" (the SQLite file holding the Optuna
    study named `name`; any earlier study of that name in it is replaced).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = add_ratios(rows)
    paths = {
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
        "html": out_dir / "report.html",
        "study": out_dir / STUDY_FILE,
    }
    write_csv(paths["csv"], rows)
    write_json(paths["json"], rows, meta)
    variants = meta.get("variants") or {}
    write_html(
        paths["html"],
        rows,
        title=f"compress report: {name}",
        recipe_text=recipe_text,
        definitions=definitions,
        environment=environment,
        sections=sections,
        charts=ratio_bar_charts(rows),
        scatter=scatter_charts(rows),
        layers=layer_charts({v: (d or {}).get("layers") for v, d in variants.items()}),
        provenance=provenance() if provenance_info is None else provenance_info,
        model_links={
            str(row["variant"]): f"variants/{quote(str(row['variant']))}/"
            for row in rows
            if (out_dir / "variants" / str(row["variant"])).is_dir()
        },
    )
    write_study(sqlite_url(paths["study"]), name, rows, meta=meta)
    logger.info(
        "report written to %s; open the study with: %s", out_dir, dashboard_command(paths["study"])
    )
    return paths
