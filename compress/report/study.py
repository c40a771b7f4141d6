"""Store a run's rows as an Optuna study, one trial per variant, for optuna-dashboard.

The study is multi-objective (perplexity, latency, weight bytes; all minimised), so the
dashboard shows the Pareto front of the variants directly.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
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
        attrs[str(key)] = mask_urls(clean) if isinstance(clean, str) else clean
    return attrs


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
            study.set_user_attr(str(key), _masked(jsonable(value)))

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


__all__ = ["OBJECTIVES", "dashboard_command", "sqlite_url", "write_study"]
