"""Reading a sweep's trial records: a trial's values, the Pareto front, the recommended picks and
how the seeded variants compare with what the sampler found.

Plain functions of the records (one dict per trial; `write_sweep_report` lists the keys):
nothing here draws or writes anything, so the sweep driver, the figures and the page all work
from the same `analyse`. All objectives are minimised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compress.metrics import as_float, ratio
from compress.report.html import format_value
from compress.report.tables import METRIC_COLUMNS

METRIC_KEYS: tuple[str, ...] = METRIC_COLUMNS
"""The flat metric keys a trial record may carry (any may be missing or None)."""


# ---------------------------------------------------------------- reading trial records


def trial_value(trial: Mapping[str, Any], key: str) -> float | None:
    """The number `key` of a trial: its objective value `values[key]` when there is one, else
    the flat metric `trial[key]` (the same number for a measured trial); None when missing,
    not a number or NaN (inf is kept)."""
    values = trial.get("values")
    if isinstance(values, Mapping):
        value = as_float(values.get(key))
        if value is not None:
            return value
    return as_float(trial.get(key))


def search_params(trial: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's active search parameters (`trial["params"]` when it is a mapping)."""
    params = trial.get("params")
    return dict(params) if isinstance(params, Mapping) else {}


def is_complete(trial: Mapping[str, Any]) -> bool:
    """The trial finished: its state is COMPLETE."""
    return trial.get("state") == "COMPLETE"


def is_feasible(trial: Mapping[str, Any]) -> bool:
    """The trial meets the constraints (a record without `feasible` counts as feasible)."""
    return bool(trial.get("feasible", True))


def _vector(trial: Mapping[str, Any], keys: Sequence[str]) -> tuple[float, ...] | None:
    """The trial's values for `keys`, or None if any is missing or not finite."""
    out: list[float] = []
    for key in keys:
        value = trial_value(trial, key)
        if value is None or not math.isfinite(value):
            return None
        out.append(value)
    return tuple(out)


def latency_noisy(trial: Mapping[str, Any]) -> bool:
    """The trial's latency ratio was marked noisy: its confidence interval stayed wider than the
    recipe's target (see the metric ``latency_noisy``)."""
    return trial.get("latency_noisy") is True


def _uses_latency(keys: Sequence[str]) -> bool:
    return any(k.startswith("latency") for k in keys)


def _trusted(trial: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """False for a trial with a noisy latency when ``keys`` judge it by latency: it is left off
    the front and out of recommendations until it is measured again."""
    return not (_uses_latency(keys) and latency_noisy(trial))


def _front_eligible(trial: Mapping[str, Any], keys: Sequence[str]) -> bool:
    return (
        is_complete(trial)
        and is_feasible(trial)
        and _vector(trial, keys) is not None
        and _trusted(trial, keys)
    )


def repeats(trials: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """{repeat trial number: the first trial with the same configuration}.

    A sampler may propose a configuration it has already had measured; the sweep reuses that
    result (the trials share a `config_key`), so both have the same numbers. Tables list a
    configuration once, under its first COMPLETE trial, and a repeat never counts as a
    sampled variant beating a seed.
    """
    first: dict[str, int] = {}
    out: dict[int, int] = {}
    for trial in sorted(trials, key=lambda t: t.get("number", 0)):
        key = trial.get("config_key")
        if not key or not is_complete(trial):
            continue
        number = trial.get("number", 0)
        if key in first:
            out[number] = first[key]
        else:
            first[key] = number
    return out


def _geomean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None or not v > 0 or not math.isfinite(v) for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ---------------------------------------------------------------- Pareto front


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b everywhere and strictly better somewhere (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices (ascending) of the non-dominated points, every coordinate minimised.

    A point is dominated when another is no worse in every coordinate and strictly better in
    one; equal points do not dominate each other, so duplicates on the front are all kept.
    Exact, O(n^2). Raises ValueError for points of different lengths or NaN coordinates.
    """
    rows = [tuple(float(x) for x in p) for p in points]
    if rows:
        dims = {len(r) for r in rows}
        if len(dims) != 1:
            raise ValueError(f"points must all have the same length, got lengths {sorted(dims)}")
        if any(math.isnan(x) for r in rows for x in r):
            raise ValueError("points must not contain NaN")
    return [
        i
        for i, p in enumerate(rows)
        if not any(_dominates(q, p) for j, q in enumerate(rows) if j != i)
    ]


def pareto_trials(
    trials: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]
) -> list[int]:
    """Numbers of the trials on the Pareto front of `objectives` (keys, all minimised), in
    trial order. Only COMPLETE, feasible trials whose every objective value is finite take
    part; failed, pruned, running and infeasible trials are never on the front, nor a trial
    whose latency is noisy when an objective is a latency."""
    keys = [key for key, _ in objectives]
    eligible = [t for t in trials if _front_eligible(t, keys)]
    points = [_vector(t, keys) for t in eligible]
    return [eligible[i]["number"] for i in pareto_front(points)]


@dataclass(frozen=True)
class SweepAnalysis:
    """What the report says about a sweep's trials, worked out once (see `analyse`)."""

    front: list[int]  # numbers of the trials on the Pareto front, repeats included
    repeated: dict[int, int]  # repeat trial number -> first trial of its configuration
    picks: list[dict]  # `recommend`
    comparison: list[dict]  # `seed_comparison`

    @property
    def distinct(self) -> list[int]:
        """The front without repeats: one trial number per configuration."""
        return [n for n in self.front if n not in self.repeated]


def analyse(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    recommendations: Sequence[Mapping[str, Any]],
) -> SweepAnalysis:
    """The front, the repeats, the recommended picks and the seed comparison of `trials`."""
    front = pareto_trials(trials, objectives)
    repeated = repeats(trials)
    return SweepAnalysis(
        front,
        repeated,
        recommend(trials, recommendations),
        seed_comparison(trials, objectives, front=front, repeated=repeated),
    )


# ---------------------------------------------------------------- recommendations


def _check_recommendation(i: int, rec: Mapping[str, Any]) -> None:
    where = f"recommendations[{i}]"
    if not isinstance(rec.get("minimize"), str):
        raise ValueError(f"{where}.minimize: must be a metric name, got {rec.get('minimize')!r}")
    bounds = rec.get("where") or {}
    if not isinstance(bounds, Mapping):
        raise ValueError(f"{where}.where: must map metric names to maxima, got {bounds!r}")
    for key, bound in bounds.items():
        if as_float(bound) is None:
            raise ValueError(f"{where}.where.{key}: must be a number (a maximum), got {bound!r}")


def _criteria_text(rec: Mapping[str, Any]) -> str:
    bounds = rec.get("where") or {}
    parts = [f"{key} ≤ {format_value(as_float(bound))}" for key, bound in bounds.items()]
    return "; ".join([*parts, f"minimise {rec['minimize']}"])


def recommend(
    trials: Sequence[Mapping[str, Any]], recommendations: Sequence[Mapping[str, Any]]
) -> list[dict]:
    """One pick per recommendation, in order.

    A recommendation is `{"name", "where": {metric: max, ...}, "minimize": metric}`. Its pick
    is the COMPLETE, feasible trial whose metrics are all present and at most their `where`
    maxima and whose `minimize` value is smallest (ties: lower perplexity, then lower trial
    number). A trial whose latency is noisy never qualifies when the recommendation involves a
    latency metric. Each result has `name`, `criteria` (text), `minimize`, `trial` (number or
    None), `seed`, `stages`, `value` (of `minimize`), `perplexity`, `candidates` (how many
    trials qualified), `noisy_excluded` (trials left out for a noisy latency) and `note` (why
    there is no pick, else "").
    """
    out: list[dict] = []
    for i, rec in enumerate(recommendations):
        _check_recommendation(i, rec)
        key = rec["minimize"]
        bounds = {k: float(as_float(v)) for k, v in (rec.get("where") or {}).items()}
        candidates = []
        noisy = 0
        for trial in trials:
            if not (is_complete(trial) and is_feasible(trial)):
                continue
            value = trial_value(trial, key)
            if value is None:
                continue
            if not _trusted(trial, [key, *bounds]):
                noisy += 1
                continue
            if all((m := trial_value(trial, k)) is not None and m <= b for k, b in bounds.items()):
                ppl = trial_value(trial, "perplexity")
                tie = math.inf if ppl is None else ppl
                candidates.append(((value, tie, trial.get("number", 0)), trial))
        result: dict[str, Any] = {
            "name": str(rec.get("name", f"recommendation {i}")),
            "criteria": _criteria_text(rec),
            "minimize": key,
            "trial": None,
            "seed": None,
            "stages": None,
            "value": None,
            "perplexity": None,
            "candidates": len(candidates),
            "noisy_excluded": noisy,
            "note": "",
        }
        if candidates:
            _, pick = min(candidates, key=lambda c: c[0])
            result.update(
                trial=pick.get("number"),
                seed=pick.get("seed"),
                stages=pick.get("stages"),
                value=trial_value(pick, key),
                perplexity=trial_value(pick, "perplexity"),
            )
        else:
            result["note"] = f"no COMPLETE feasible trial meets {result['criteria']}"
        if noisy:
            result["note"] = "; ".join(
                n
                for n in (
                    result["note"],
                    f"{noisy} trial(s) with a noisy latency left out (measure them again)",
                )
                if n
            )
        out.append(result)
    return out


# ---------------------------------------------------------------- seeds vs sampled


def seed_comparison(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    *,
    front: Sequence[int] | None = None,
    repeated: Mapping[int, int] | None = None,
) -> list[dict]:
    """For each seeded trial (baseline included), the sampled trials that beat it.

    Each result: `seed`, `trial`, `state`, `feasible`, `stages`, `values` ({objective key:
    value}, None when the seed has no finite value for every objective), `on_front`,
    `dominated_by` (sampled COMPLETE feasible trials that Pareto-dominate the seed, each
    configuration once (see `repeats`), best first by the geometric mean of their ratios;
    each `{"trial", "stages", "ratios": {key: sampled value / seed value}, "geomean_ratio"}`),
    `front_dominators` (numbers of front trials, seeded or sampled, that dominate it) and
    `covered_by_front`: True when the seed is on the front or dominated by a front member,
    None when the seed cannot be on the front at all (not COMPLETE, infeasible, or missing an
    objective value). `front` and `repeated` are `pareto_trials` and `repeats` of `trials`,
    computed here when not given.
    """
    keys = [key for key, _ in objectives]
    front = set(pareto_trials(trials, objectives) if front is None else front)
    repeated = repeats(trials) if repeated is None else repeated
    front_vectors = {t["number"]: _vector(t, keys) for t in trials if t.get("number") in front}
    sampled = {  # trial -> its objective values; a repeat of a seed's configuration is no rival
        t["number"]: (t, _vector(t, keys))
        for t in trials
        if t.get("seed") is None and _front_eligible(t, keys) and t["number"] not in repeated
    }
    out: list[dict] = []
    for seed in trials:
        if seed.get("seed") is None:
            continue
        vector = _vector(seed, keys) if is_complete(seed) else None
        dominated_by: list[dict] = []
        front_dominators: list[int] = []
        if vector is not None:
            for other, theirs in sampled.values():
                if _dominates(theirs, vector):
                    ratios = {k: ratio(t, s) for k, t, s in zip(keys, theirs, vector)}
                    dominated_by.append(
                        {
                            "trial": other["number"],
                            "stages": other.get("stages"),
                            "ratios": ratios,
                            "geomean_ratio": _geomean(list(ratios.values())),
                        }
                    )
            dominated_by.sort(
                key=lambda d: (
                    math.inf if d["geomean_ratio"] is None else d["geomean_ratio"],
                    d["trial"],
                )
            )
            front_dominators = [n for n, v in front_vectors.items() if _dominates(v, vector)]
        on_front = seed.get("number") in front
        eligible = _front_eligible(seed, keys)
        out.append(
            {
                "seed": str(seed.get("seed")),
                "trial": seed.get("number"),
                "state": seed.get("state"),
                "feasible": is_feasible(seed),
                "stages": seed.get("stages"),
                "values": None if vector is None else dict(zip(keys, vector)),
                "on_front": on_front,
                "dominated_by": dominated_by,
                "front_dominators": front_dominators,
                "covered_by_front": (on_front or bool(front_dominators)) if eligible else None,
            }
        )
    return out
