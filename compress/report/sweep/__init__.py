"""The report of an Optuna sweep over compressor combinations, built from measured trial records.

Nothing here measures anything or talks to Optuna: the caller passes one dict per trial (see
`write_sweep_report` for the keys) plus parameter importances it computed itself. This package
finds the Pareto front, picks the recommended trials, compares the seeded single-technique
variants with what the sampler found, and writes `trials.csv`, `trials.json` and a
self-contained `report.html` in the same style as the per-run report (`compress.report.html`).

All objectives are minimised.

One concern per module: `analysis` reads the trial records (front, picks, seed comparison),
`plots` draws the figures, `page` builds the HTML sections; this module writes the files
(`write_sweep_report`) and re-exports the public names.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress import atomic
from compress.report.html import charts_html, html_page
from compress.report.sweep.analysis import (
    METRIC_KEYS,
    SweepAnalysis,
    analyse,
    is_feasible,
    pareto_front,
    pareto_trials,
    recommend,
    search_params,
    seed_comparison,
)
from compress.report.sweep.page import (
    caption,
    failed_html,
    front_html,
    front_variants_yaml,
    importance_html,
    recommendations_html,
    seed_html,
    summary_html,
    trials_html,
)
from compress.report.sweep.plots import front_plots, place_labels
from compress.report.tables import jsonable, write_csv, write_json

logger = logging.getLogger(__name__)

# Keys of a trial record that are not metrics and get their own columns (or none) in tables.
_RECORD_KEYS = frozenset(
    {
        "number",
        "state",
        "seed",
        "params",
        "stages",
        "pipeline",
        "values",
        "feasible",
        "error",
        "cached_from",
        "seconds",
        "worker",
    }
)


# ---------------------------------------------------------------- CSV / JSON rows


def _flat_rows(
    trials: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]], front: set[int]
) -> list[dict]:
    """One flat dict per trial, every one with the same keys in the CSV's column order."""
    value_keys: dict[str, None] = dict.fromkeys(key for key, _ in objectives)
    param_keys: dict[str, None] = {}
    extra_keys: dict[str, None] = {}
    for trial in trials:
        if isinstance(trial.get("values"), Mapping):
            value_keys.update(dict.fromkeys(str(k) for k in trial["values"]))
        param_keys.update(dict.fromkeys(str(k) for k in search_params(trial)))
        extra_keys.update(
            dict.fromkeys(k for k in trial if k not in _RECORD_KEYS and k not in METRIC_KEYS)
        )
    rows = []
    for trial in trials:
        values = trial.get("values") if isinstance(trial.get("values"), Mapping) else {}
        row: dict[str, Any] = {
            "number": trial.get("number"),
            "seed": trial.get("seed"),
            "state": trial.get("state"),
            "feasible": is_feasible(trial),
            "on_front": trial.get("number") in front,
            "cached_from": trial.get("cached_from"),
            "seconds": trial.get("seconds"),
            "worker": trial.get("worker"),
            "stages": trial.get("stages"),
        }
        row.update({f"value.{k}": values.get(k) for k in value_keys})
        row.update({k: trial.get(k) for k in METRIC_KEYS})
        row.update({k: trial.get(k) for k in extra_keys})
        params = search_params(trial)
        row.update({f"param.{k}": params.get(k) for k in param_keys})
        pipeline = trial.get("pipeline")
        row["pipeline"] = json.dumps(jsonable(pipeline)) if pipeline else None
        row["error"] = trial.get("error")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- entry point


def write_sweep_report(
    out_dir: str | Path,
    trials: Sequence[Mapping[str, Any]],
    *,
    name: str,
    objectives: Sequence[tuple[str, str]],
    constraints: Sequence[Mapping[str, Any]],
    recommendations: Sequence[Mapping[str, Any]],
    importances: Mapping[str, Mapping[str, float]],
    importance_note: str = "",
    recipe_text: str,
    meta: Mapping[str, Any],
    definitions: Mapping[str, str],
    environment: Mapping[str, str],
    analysis: SweepAnalysis | None = None,
) -> dict[str, Path]:
    """Write a sweep's report into `out_dir` (created if needed) and return the file paths
    (keys "csv", "json", "html").

    `trials`: one dict per trial, in trial order, with `number`, `state` (Optuna's state
    name), `seed` (the seeded variant's name, "baseline" for the baseline, None when the
    sampler proposed it), `params` (search parameters), `stages`, `pipeline` (recipe form),
    `values` ({objective key: value}), `feasible`, `error`, `cached_from`, `seconds`,
    `worker`, `config_key` (trials with the same one are the same configuration) and the flat
    metrics of `METRIC_KEYS`; anything may be missing.
    `objectives`: (metric key, label) pairs, all minimised. `importances`: objective key ->
    {param: importance}; when empty the page shows `importance_note`. `analysis`:
    `analyse(trials, objectives, recommendations)`, if the caller has it already.
    """
    if not objectives:
        raise ValueError("objectives: at least one (metric key, label) pair is required")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "trials.csv",
        "json": out_dir / "trials.json",
        "html": out_dir / "report.html",
    }
    a = analysis or analyse(trials, objectives, recommendations)
    covered = [r["covered_by_front"] for r in a.comparison if r["covered_by_front"] is not None]
    front_set = set(a.front)

    rows = _flat_rows(trials, objectives, front_set)
    write_csv(paths["csv"], rows, columns=list(rows[0]) if rows else [])

    sweep_meta = {
        "objectives": [list(o) for o in objectives],
        "constraints": list(constraints),
        "front": a.front,
        "front_configurations": a.distinct,
        "repeats": {str(k): v for k, v in a.repeated.items()},
        "recommendations": a.picks,
        "seed_comparison": a.comparison,
        "front_covers_seeds": all(covered),
        "importances": dict(importances),
        "importance_note": importance_note,
    }
    json_rows = [dict(t, on_front=t.get("number") in front_set) for t in trials]
    write_json(paths["json"], json_rows, {**dict(meta), "sweep": sweep_meta})

    failed = [t for t in trials if t.get("state") == "FAIL"]
    snippet = front_variants_yaml(trials, a)
    charts = front_plots(trials)
    sections = [
        ("Summary", summary_html(trials, objectives, constraints, a)),
        (
            "Pareto front plots",
            charts_html(charts)
            + caption(
                "Every COMPLETE trial; the step line is the 2-D front of the feasible ones for "
                "that pair of metrics; circled points are the seeded variants."
            )
            if charts
            else caption("No trial has perplexity with latency ratio or weight bytes: no plots."),
        ),
        ("Pareto front (all objectives)", front_html(trials, objectives, a)),
        ("Recommendations", recommendations_html(a.picks)),
        ("Seeded variants vs sampled variants", seed_html(a.comparison, objectives)),
        ("Parameter importances", importance_html(importances, objectives, importance_note)),
        ("All trials", trials_html(trials, objectives, front_set)),
    ]
    if meta.get("notes"):  # what makes the numbers mean less (see compress.sanity)
        items = "".join(f"<li>{html.escape(str(n))}</li>" for n in meta["notes"])
        sections.insert(0, ("Notes", f"<ul>{items}</ul>"))
    if failed:
        sections.append((f"Failed trials ({len(failed)})", failed_html(failed)))
    sections.append(
        (
            "Front trials as recipe variants",
            (f"<pre>{html.escape(snippet)}</pre>" if snippet else caption("The front is empty."))
            + caption("Paste the entries under a recipe's variants: key."),
        )
    )
    page = html_page(
        f"compress sweep: {name}",
        sections,
        recipe_text=recipe_text,
        definitions=definitions,
        environment=environment,
    )
    atomic.write_text(paths["html"], page)
    logger.info(
        "sweep report written to %s: %d trials, %d on the front", out_dir, len(trials), len(a.front)
    )
    return paths


__all__ = [
    "METRIC_KEYS",
    "SweepAnalysis",
    "analyse",
    "front_variants_yaml",
    "pareto_front",
    "pareto_trials",
    "place_labels",
    "recommend",
    "seed_comparison",
    "write_sweep_report",
]
