"""Store a run's rows as an Optuna study, one trial per variant, for optuna-dashboard.

The study is multi-objective (perplexity, latency, weight bytes; all minimised), so the
dashboard shows the Pareto front of the variants directly.
"""

from __future__ import annotations

import html
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from compress.metrics import as_float
from compress.report.tables import jsonable
from compress.storage import STUDY_FILE, SWEEP_FILE, command_for, mask_urls, sqlite_url

logger = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("perplexity", "latency_ms", "weight_bytes")
"""The study's objectives (metric keys of :mod:`compress.metrics`), in order."""


def _objective_values(row: dict) -> tuple[list[float] | None, str | None]:
    """The row's objective values, or None and the reason the trial must be FAIL."""
    if row.get("status") != "ok":
        return None, str(row.get("error") or f"status {row.get('status')!r}")
    values: list[float] = []
    missing: list[str] = []
    for key in OBJECTIVES:
        value = as_float(row.get(key))  # None for missing and NaN
        if value is None:
            missing.append(key)
        else:
            values.append(value)
    if missing:
        return None, str(row.get("error") or f"missing metric(s): {', '.join(missing)}")
    return values, None


def _masked(value: Any) -> Any:
    """A JSON-able value with every URL's password in its strings masked."""
    return json.loads(mask_urls(json.dumps(value)))


def _user_attrs(row: dict) -> dict[str, Any]:
    """Every key of `row` whose value is JSON-able (NaN/inf as None; others skipped); a URL's
    password in a string (an error message) is masked."""
    attrs: dict[str, Any] = {}
    for key, value in row.items():
        clean = jsonable(value)
        if isinstance(clean, str) and not isinstance(value, str):
            logger.debug("user attr %r skipped: %r is not JSON-able", key, type(value))
            continue
        attrs[str(key)] = mask_urls(clean) if isinstance(clean, str) else readable(clean)
    return attrs


BULKY_META = frozenset({"training", "variants", "generation"})
"""Keys of a run's metadata left out of the study's attributes (curves, per-variant detail)."""

SIGNIFICANT = 6  # digits a float user attribute keeps: 0.15000000000000002 -> 0.15


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT}g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}={_text(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)


def readable(value: Any) -> Any:
    """A value as the dashboard should show it: a float rounded to :data:`SIGNIFICANT`
    significant digits, a list or mapping as one line of text (``name=value``), NaN/inf as
    None, everything else as it is."""
    value = jsonable(value)
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}")
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return value


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{len(value)} values"
    return str(readable(value))


def _table(rows: Sequence[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    if not rows:
        return "<p>none</p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head) if any(head) else ""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{body}</table>"


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem;"
    "line-height:1.4}table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid "
    "#ccc;padding:.2rem .5rem;text-align:left;vertical-align:top}td{font-variant-numeric:"
    "tabular-nums}h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem}"
)


def trial_report_html(
    title: str,
    stages: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    details: Mapping[str, Any] | None = None,
    note: str = "",
) -> str:
    """One trial's own report, a small standalone HTML page: what it built (its stages as
    text and its parameters), every metric with its label, and what its stages and
    measurements reported (`details`: ``stage_reports``, ``perplexity``, ``latency``,
    ``rss``, each optional)."""
    from compress.metrics import BY_KEY

    details = details or {}
    metric_rows = [
        (BY_KEY[k].label if k in BY_KEY else k, v)
        for k, v in metrics.items()
        if not isinstance(v, (dict, list))
    ]
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(stages or 'the baseline, unchanged')}</p>",
        f"<p>{html.escape(note)}</p>" if note else "",
        "<h2>Parameters</h2>",
        _table(list(params.items())),
        "<h2>Metrics</h2>",
        _table(metric_rows),
    ]
    for rep in details.get("stage_reports") or []:
        rows = [
            ("settings", rep.get("config")),
            ("modules converted", len(rep.get("touched") or [])),
            ("modules skipped", len(rep.get("skipped") or [])),
            ("weight bytes before", rep.get("weight_bytes_before")),
            ("weight bytes after", rep.get("weight_bytes_after")),
            ("seconds", rep.get("seconds")),
            *((k, v) for k, v in (rep.get("extra") or {}).items()),
        ]
        parts += [f"<h2>Stage {html.escape(str(rep.get('stage')))}</h2>", _table(rows)]
        skipped = rep.get("skipped") or []
        if skipped:
            parts.append(
                _table([(x.get("module"), x.get("reason")) for x in skipped], ("module", "skipped"))
            )
    for key, heading in (("perplexity", "Perplexity"), ("latency", "Latency"), ("rss", "Memory")):
        block = details.get(key)
        if isinstance(block, Mapping):
            flat = []
            for k, v in block.items():
                if isinstance(v, Mapping):
                    flat += [(f"{k} {kk}", vv) for kk, vv in v.items()]
                else:
                    flat.append((k, v))
            parts += [f"<h2>{heading}</h2>", _table(flat)]
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


def _f(value: Any, spec: str) -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, spec)


def run_note(rows: Sequence[dict]) -> str:
    """The study note of a plain run (markdown, shown on the dashboard's study page): each
    variant's headline numbers, and which variant to take for what, saying which comparisons
    the data cannot back (a perplexity change within noise, a noisy latency ratio)."""
    if not rows:
        return "No variants."
    lines = [
        "## Summary",
        "",
        "| variant | perplexity | change vs baseline [95% CI] | latency x | weights x | status |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        delta = "-"
        if i and isinstance(r.get("ppl_delta"), (int, float)):
            delta = (
                f"{r['ppl_delta']:+.3f} [{_f(r.get('ppl_delta_lo'), '+.3f')}, "
                f"{_f(r.get('ppl_delta_hi'), '+.3f')}]"
                + (" within noise" if r.get("ppl_within_noise") else "")
            )
        lat = _f(r.get("latency_ratio"), ".3f") + (" (noisy)" if r.get("latency_noisy") else "")
        status = "ok" if r.get("status") == "ok" else f"FAILED: {r.get('error')}"
        cells = [
            str(r.get("variant")),
            _f(r.get("perplexity"), ".3f"),
            delta,
            lat,
            _f(r.get("weight_bytes_ratio"), ".3f"),
            status.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ok = [r for r in rows[1:] if r.get("status") == "ok"]
    lines += ["", "## Recommendations", ""]
    same = [r for r in ok if r.get("ppl_within_noise") and r.get("weight_bytes") is not None]
    if same:
        best = min(same, key=lambda r: r["weight_bytes"])
        lines.append(
            f"- Smallest variant whose perplexity the data cannot tell from the baseline's: "
            f"**{best['variant']}** (weights {_f(best.get('weight_bytes_ratio'), '.3f')}x)."
        )
    else:
        lines.append("- No variant's perplexity is within noise of the baseline's.")
    fast = [
        r
        for r in ok
        if isinstance(r.get("latency_ratio"), (int, float)) and not r.get("latency_noisy")
    ]
    if fast:
        best = min(fast, key=lambda r: r["latency_ratio"])
        verdict = "faster than" if best["latency_ratio"] < 1 else "no faster than"
        lines.append(
            f"- Fastest variant with a trustworthy latency ratio: **{best['variant']}** "
            f"({best['latency_ratio']:.3f}x, {verdict} the baseline)."
        )
    noisy = [str(r["variant"]) for r in ok if r.get("latency_noisy")]
    if noisy:
        lines.append(
            f"- Latency ratios too noisy to rank: {', '.join(noisy)} (their 95% interval stayed "
            "wider than eval.latency.ci_target); measure again on a quieter machine."
        )
    failed = [str(r.get("variant")) for r in rows if r.get("status") != "ok"]
    if failed:
        lines.append(f"- Failed: {', '.join(failed)} (the report has each traceback).")
    return mask_urls("\n".join(lines))


def save_note(study: optuna.Study, body: str) -> None:
    """`body` (markdown) as the study's note on the dashboard's study page; a failure is
    logged, never fatal (the numbers are in the study and the report already)."""
    try:
        import optuna_dashboard
    except ImportError:  # the dashboard is optional: nothing would show the note
        return
    try:
        optuna_dashboard.save_note(study, body)
    except Exception as exc:  # storage errors: the note is a convenience
        logger.warning("could not write the study note: %s", exc)


def write_study(
    storage: str,
    study_name: str,
    rows: Sequence[dict],
    meta: dict | None = None,
) -> None:
    """Write `rows` as the Optuna study `study_name` in `storage` (an SQLAlchemy URL such as
    `sqlite:///reports/x/study.db`), replacing any study of that name there.

    One trial per row, in row order: param `variant`, values (perplexity, latency median,
    weight bytes), every JSON-able key of the row as a user attr. A row that failed or lacks
    one of the three values becomes a FAIL trial with a user attr `error`. Each key of
    `meta` becomes a study user attr.
    """
    rdb = optuna.storages.RDBStorage(storage)
    try:
        try:
            optuna.delete_study(study_name=study_name, storage=rdb)
            logger.info("replaced existing study %r in %s", study_name, storage)
        except KeyError:
            pass
        study = optuna.create_study(
            storage=rdb,
            study_name=study_name,
            directions=["minimize"] * len(OBJECTIVES),
        )
        with warnings.catch_warnings():  # experimental in optuna, but stable in practice
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
        for key, value in (meta or {}).items():
            if key in BULKY_META:  # in results.json; as an attribute, only a wall of JSON
                continue
            study.set_user_attr(str(key), readable(_masked(jsonable(value))))

        names = [str(row.get("variant")) for row in rows]
        distribution = CategoricalDistribution(choices=list(dict.fromkeys(names)))
        for name, row in zip(names, rows, strict=True):
            values, error = _objective_values(row)
            attrs = _user_attrs(row)
            if values is None:
                attrs["error"] = mask_urls(str(error))
                state = TrialState.FAIL
            else:
                state = TrialState.COMPLETE
            trial = optuna.trial.create_trial(
                state=state,
                values=values,
                params={"variant": name},
                distributions={"variant": distribution},
                user_attrs=attrs,
            )
            study.add_trial(trial)
        save_note(study, run_note(rows))
        logger.info("wrote study %r (%d trials) to %s", study_name, len(rows), storage)
    finally:
        rdb.engine.dispose()


def dashboard_command(path: str | Path) -> str:
    """The shell command that opens a run's study in optuna-dashboard, with its artifacts:
    `python -m compress.dashboard <report folder>`. `path` is the report folder or a file in
    it (its study.db or sweep.json); a relative path stays relative.
    """
    path = Path(path)
    if path.name in (STUDY_FILE, SWEEP_FILE) or path.is_file():
        path = path.parent
    return command_for(path)


__all__ = [
    "OBJECTIVES",
    "dashboard_command",
    "readable",
    "run_note",
    "save_note",
    "sqlite_url",
    "trial_report_html",
    "write_study",
]
