"""The report of an Optuna sweep over compressor combinations, built from measured trial records.

Nothing here measures anything or talks to Optuna: the caller passes one dict per trial (see
`write_sweep_report` for the keys) plus parameter importances it computed itself. This module
finds the Pareto front, picks the recommended trials, compares the seeded single-technique
variants with what the sampler found, and writes `trials.csv`, `trials.json` and a
self-contained `report.html` in the same style as the per-run report (`compress.report.html`).

All objectives are minimised.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compress import atomic
from compress.metrics import as_float, ratio
from compress.report.html import _MB, charts_html, format_value, html_page, html_table
from compress.report.plots import legend_svg
from compress.report.tables import METRIC_COLUMNS, jsonable, write_csv, write_json

logger = logging.getLogger(__name__)

METRIC_KEYS: tuple[str, ...] = METRIC_COLUMNS
"""The flat metric keys a trial record may carry (any may be missing or None)."""

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

_STATES: tuple[str, ...] = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
_BLUE, _RED, _GREY = "#4C72B0", "#C44E52", "0.55"


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


def _complete(trial: Mapping[str, Any]) -> bool:
    return trial.get("state") == "COMPLETE"


def _feasible(trial: Mapping[str, Any]) -> bool:
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
        _complete(trial)
        and _feasible(trial)
        and _vector(trial, keys) is not None
        and _trusted(trial, keys)
    )


def _kind(trial: Mapping[str, Any]) -> str:
    seed = trial.get("seed")
    return f"seed: {seed}" if seed is not None else "sampled"


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
        if not key or not _complete(trial):
            continue
        number = trial.get("number", 0)
        if key in first:
            out[number] = first[key]
        else:
            first[key] = number
    return out


def _also(number: int, repeated: Mapping[int, int]) -> str | None:
    """'#5, #7' for the repeats of trial `number`, or None."""
    numbers = [r for r, f in repeated.items() if f == number]
    return ", ".join(f"#{n}" for n in sorted(numbers)) or None


def _baseline(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for trial in trials:
        if trial.get("seed") == "baseline":
            return trial
    return trials[0] if trials else None


def _cell(value: float | None) -> float | int | None:
    """A number for a table cell: whole numbers of 1000 and more (bytes) as ints, so that
    `format_value` prints 17,203,200 rather than 17,203,200.0."""
    if value is not None and math.isfinite(value) and value.is_integer() and abs(value) >= 1e3:
        return int(value)
    return value


def _is_ratio(key: str) -> bool:
    """Metrics named `*_ratio` are already relative to the baseline."""
    return key.endswith("_ratio")


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
            if not (_complete(trial) and _feasible(trial)):
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
        vector = _vector(seed, keys) if _complete(seed) else None
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
                "feasible": _feasible(seed),
                "stages": seed.get("stages"),
                "values": None if vector is None else dict(zip(keys, vector)),
                "on_front": on_front,
                "dominated_by": dominated_by,
                "front_dominators": front_dominators,
                "covered_by_front": (on_front or bool(front_dominators)) if eligible else None,
            }
        )
    return out


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
            "feasible": _feasible(trial),
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


# ---------------------------------------------------------------- plots


def front_plot(
    trials: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_scale: float = 1.0,
) -> bytes | None:
    """An SVG scatter of every COMPLETE trial with finite `x_key` and `y_key`, the 2-D Pareto
    front of the feasible ones as a step line, infeasible trials as grey crosses and seeded
    trials labelled by name. None when no trial has both values."""
    points = []
    for trial in trials:
        x, y = trial_value(trial, x_key), trial_value(trial, y_key)
        if _complete(trial) and x is not None and y is not None:
            if math.isfinite(x) and math.isfinite(y):
                points.append((x / x_scale, y, trial))
    if not points:
        logger.info("no trial has both %s and %s: plot skipped", x_key, y_key)
        return None
    feasible = [p for p in points if _feasible(p[2])]
    infeasible = [p for p in points if not _feasible(p[2])]
    on_front = set(pareto_front([(x, y) for x, y, _ in feasible]))

    fig = Figure(figsize=(6.4, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)

    def dots(ps: list, **style: Any) -> None:
        if ps:
            ax.scatter([p[0] for p in ps], [p[1] for p in ps], **style)

    front = sorted((feasible[i] for i in on_front), key=lambda p: (p[0], p[1]))
    rest = [p for i, p in enumerate(feasible) if i not in on_front]
    dots(rest, s=22, color=_BLUE, alpha=0.6, label="feasible trial")
    dots(infeasible, s=26, marker="x", color=_GREY, label="infeasible trial")
    if front:
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        ax.step(xs, ys, where="post", color=_RED, linewidth=1.4, label="2-D Pareto front")
        dots(front, s=34, color=_RED, zorder=3)
    seeds = [p for p in points if p[2].get("seed") is not None]
    dots(
        seeds,
        s=90,
        facecolors="none",
        edgecolors="black",
        linewidths=1.0,
        zorder=4,
        label="seeded variant",
    )
    ax.margins(0.08)
    if seeds:
        _label_seeds(ax, seeds)
    return legend_svg(fig)


LABEL_OFFSETS: tuple[tuple[float, float], ...] = (
    (6, 4),
    (6, -14),
    (-6, 4),
    (-6, -14),
    (6, 18),
    (6, -28),
    (-6, 18),
    (-6, -28),
    (6, 32),
    (6, -42),
)
"""Where a point's label may go, in points from the point (tried in order); a negative x
offset puts the label's right edge there."""


def place_labels(
    anchors: Sequence[tuple[float, float]],
    texts: Sequence[str],
    char_w: float = 5.5,
    line_h: float = 11.0,
) -> list[tuple[float, float]]:
    """An offset from :data:`LABEL_OFFSETS` for each label so that no two labels' boxes
    overlap, nor a label and a point, where an offset allows it (greedy, labels placed from
    the lowest anchor up).

    `anchors` are the points in display units (points, y up), `char_w` and `line_h` a
    character's width and a line's height there. A label no offset frees goes where it
    overlaps least."""

    def box(i: int, off: tuple[float, float]) -> tuple[float, float, float, float]:
        (x, y), w = anchors[i], char_w * len(texts[i])
        left = x + off[0] if off[0] >= 0 else x + off[0] - w
        return left, y + off[1], left + w, y + off[1] + line_h

    def overlap(a: tuple, b: tuple) -> float:
        dx = min(a[2], b[2]) - max(a[0], b[0])
        dy = min(a[3], b[3]) - max(a[1], b[1])
        return max(dx, 0.0) * max(dy, 0.0)

    r = 5.0  # a marker's half-width: labels keep off the points too
    placed: list[tuple] = [(x - r, y - r, x + r, y + r) for x, y in anchors]
    out: list[tuple[float, float]] = [LABEL_OFFSETS[0]] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: (anchors[i][1], anchors[i][0])):
        costs = [sum(overlap(box(i, off), b) for b in placed) for off in LABEL_OFFSETS]
        best = LABEL_OFFSETS[costs.index(min(costs))]  # the first of the least overlapping
        out[i] = best
        placed.append(box(i, best))
    return out


def _label_seeds(ax: Any, seeds: list) -> None:
    """Each seeded trial's name beside its point; names of trials at the same point share one
    label (``int8, int8-again``), and labels are spread so that they do not overprint."""
    groups: dict[tuple[float, float], list[str]] = {}
    for x, y, trial in seeds:
        names = groups.setdefault((x, y), [])
        if str(trial.get("seed")) not in names:
            names.append(str(trial.get("seed")))
    ax.autoscale_view()
    to_points = 72.0 / ax.figure.dpi
    where = list(groups)
    anchors = [tuple(v * to_points for v in ax.transData.transform(xy)) for xy in where]
    texts = [", ".join(names) for names in groups.values()]
    for xy, text, off in zip(where, texts, place_labels(anchors, texts), strict=True):
        ax.annotate(
            text,
            xy,
            xytext=off,
            textcoords="offset points",
            fontsize="small",
            ha="left" if off[0] >= 0 else "right",
            parse_math=False,
            arrowprops={"arrowstyle": "-", "color": _GREY, "linewidth": 0.6}
            if abs(off[1]) > 10
            else None,
        )


def importance_chart(
    importances: Mapping[str, Mapping[str, float]], labels: Mapping[str, str]
) -> bytes | None:
    """Horizontal grouped bars: each parameter's importance for each objective (`labels` maps
    objective key to label). None when there is nothing to show."""
    series = {k: v for k, v in importances.items() if v}
    if not series:
        return None
    params = _params_by_importance(series)
    fig = Figure(
        figsize=(7.0, 1.2 + 0.42 * len(params) * max(1, len(series)) ** 0.5),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title("Parameter importance per objective")
    ax.set_xlabel("importance")
    colors = (_BLUE, "#DD8452", "#55A868", "#8172B3", _RED)
    height = 0.8 / len(series)
    for i, (key, values) in enumerate(series.items()):
        ys = [y + (i - (len(series) - 1) / 2) * height for y in range(len(params))]
        widths = [as_float(values.get(p)) or 0.0 for p in params]
        ax.barh(
            ys,
            widths,
            height=height,
            color=colors[i % len(colors)],
            label=str(labels.get(key, key)).replace("$", r"\$"),  # no mathtext
        )
    ax.set_yticks(range(len(params)))
    ax.set_yticklabels(params, parse_math=False)
    ax.invert_yaxis()  # most important on top
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return legend_svg(fig)


def _params_by_importance(series: Mapping[str, Mapping[str, float]]) -> list[str]:
    best: dict[str, float] = {}
    for values in series.values():
        for param, value in values.items():
            best[str(param)] = max(best.get(str(param), 0.0), as_float(value) or 0.0)
    return sorted(best, key=lambda p: (-best[p], p))


# ---------------------------------------------------------------- HTML pieces


def _p(text: str) -> str:
    return f'<p class="caption">{html.escape(text)}</p>'


def _summary_html(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    constraints: Sequence[Mapping[str, Any]],
    analysis: SweepAnalysis,
) -> str:
    states = Counter(str(t.get("state")) for t in trials)
    order = [s for s in _STATES if s in states] + sorted(s for s in states if s not in _STATES)
    cached = [t for t in trials if t.get("cached_from")]
    seconds = sum(as_float(t.get("seconds")) or 0.0 for t in trials if not t.get("cached_from"))
    infeasible = sum(1 for t in trials if _complete(t) and not _feasible(t))
    workers = sorted({str(t["worker"]) for t in trials if t.get("worker")})
    facts = [
        {"item": "trials", "value": len(trials)},
        *({"item": f"state {s}", "value": states[s]} for s in order),
        {"item": "complete but infeasible", "value": infeasible},
        {"item": "cached (result reused, not recomputed)", "value": len(cached)},
        {"item": "compute seconds (cached results not counted)", "value": round(seconds, 1)},
        {"item": "workers", "value": ", ".join(workers) or None},
        {
            "item": "Pareto front: configurations (trials)",
            "value": f"{len(analysis.distinct)} ({len(analysis.front)})",
        },
    ]
    constraint_text = "; ".join(_constraint_text(c) for c in constraints) or "none"
    facts.append({"item": "constraints", "value": constraint_text})

    baseline = _baseline(trials)
    best_rows = []
    bests = recommend(trials, [{"name": label, "minimize": key} for key, label in objectives])
    for (key, label), best in zip(objectives, bests):
        if best["trial"] is None:
            best_rows.append({"objective": label, "trial": "none"})
            continue
        ref = trial_value(baseline, key) if baseline is not None else None
        best_rows.append(
            {
                "objective": label,
                "best value": _cell(best["value"]),
                "× baseline": None if _is_ratio(key) else ratio(best["value"], ref),
                "trial": f"#{best['trial']}",
                "variant": _kind(best),
                "stages": best["stages"] or "(baseline)",
            }
        )
    return (
        html_table(facts, ["item", "value"])
        + "<h3>Best feasible trial per objective</h3>"
        + html_table(
            best_rows, ["objective", "best value", "× baseline", "trial", "variant", "stages"]
        )
        + _p(
            "All objectives are minimised. × baseline = value / the baseline trial's value "
            "(— for objectives that are already ratios to the baseline)."
        )
    )


def _constraint_text(constraint: Mapping[str, Any]) -> str:
    return f"{constraint.get('metric')} ≤ {format_value(as_float(constraint.get('max')))}"


def _objective_columns(
    trial: Mapping[str, Any],
    objectives: Sequence[tuple[str, str]],
    baseline: Mapping[str, Any] | None,
) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for key, label in objectives:
        value = trial_value(trial, key)
        ref = trial_value(baseline, key) if baseline is not None else None
        cells[label] = _cell(value)
        if not _is_ratio(key):
            cells[f"{label} × baseline"] = ratio(value, ref)
    return cells


def _front_html(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    analysis: SweepAnalysis,
) -> str:
    if not analysis.front:
        return _p("No trial is on the front: no COMPLETE, feasible trial has every objective.")
    baseline = _baseline(trials)
    members = set(analysis.distinct)
    repeated = analysis.repeated
    records = []
    for trial in trials:
        if trial.get("number") in members:
            records.append(
                {
                    "trial": f"#{trial.get('number')}",
                    "variant": _kind(trial),
                    "stages": trial.get("stages") or "(baseline)",
                    **_objective_columns(trial, objectives, baseline),
                    "cached from": trial.get("cached_from"),
                    "repeated by": _also(trial.get("number", 0), repeated),
                }
            )
    labels = ", ".join(label for _, label in objectives)
    return html_table(records) + _p(
        f"Non-dominated COMPLETE, feasible trials over all objectives ({labels}), each "
        "configuration once: 'repeated by' lists later trials of the same configuration, "
        "whose numbers were reused. × baseline = value / the baseline trial's value (not "
        "repeated for objectives that are already ratios to the baseline)."
    )


def _recommendations_html(picks: Sequence[Mapping[str, Any]]) -> str:
    if not picks:
        return _p("No recommendations were asked for.")
    records = []
    for pick in picks:
        found = pick["trial"] is not None
        records.append(
            {
                "recommendation": pick["name"],
                "criteria": pick["criteria"],
                "pick": f"#{pick['trial']}" if found else "none",
                "variant": _kind(pick) if found else None,
                "stages": (pick["stages"] or "(baseline)") if found else pick["note"],
                "minimised value": _cell(pick["value"]),
                "perplexity": pick["perplexity"],
                "qualifying trials": pick["candidates"],
                "left out: noisy latency": pick.get("noisy_excluded") or None,
            }
        )
    return html_table(records) + _p(
        "The pick is the COMPLETE, feasible trial meeting every maximum with the smallest "
        "minimised value (ties: lower perplexity). A trial whose latency ratio is noisy (its "
        "95% interval wider than the recipe's target) is never picked by a latency criterion "
        "until it is measured again."
    )


def _seed_html(
    comparison: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]
) -> str:
    if not comparison:
        return _p("No seeded trials.")
    summary = []
    pairs = []
    for row in comparison:
        beaten = row["dominated_by"]
        if row["values"] is None:
            status = f"not comparable ({row['state']}, missing objective values)"
        elif row["on_front"]:
            status = "on the front"
        elif not row["feasible"]:
            status = "infeasible"
        else:
            status = "dominated"
        best = beaten[0] if beaten else None
        record: dict[str, Any] = {
            "seed": row["seed"],
            "trial": f"#{row['trial']}",
            "stages": row["stages"] or "(baseline)",
            "status": status,
            "beaten by (sampled)": len(beaten),
            "best sampled": f"#{best['trial']}" if best else None,
        }
        for key, label in objectives:
            record[f"{label} ratio"] = best["ratios"][key] if best else None
        summary.append(record)
        for d in beaten[:5]:
            pair = {
                "seed": row["seed"],
                "sampled trial": f"#{d['trial']}",
                "sampled stages": d["stages"],
            }
            pair.update({f"{label} ratio": d["ratios"][k] for k, label in objectives})
            pair["geometric mean ratio"] = d["geomean_ratio"]
            pairs.append(pair)
        if len(beaten) > 5:
            pairs.append({"seed": row["seed"], "sampled trial": f"… {len(beaten) - 5} more"})
    eligible = [r for r in comparison if r["covered_by_front"] is not None]
    covered = [r for r in eligible if r["covered_by_front"]]
    verdict = "yes" if len(covered) == len(eligible) else "NO"
    parts = [
        html_table(summary),
        _p(
            "Ratios are the best sampled trial's value / the seed's value (below 1 is better); "
            "the best is the dominating sampled trial with the smallest geometric mean ratio."
        ),
        f"<p>Front never worse than the seeds: <b>{html.escape(verdict)}</b> — "
        f"{len(covered)} of {len(eligible)} seeds that could be on the front are on it or "
        "dominated by a front member.</p>",
    ]
    if pairs:
        parts += [
            "<h3>Sampled trials that dominate a seed (best 5 per seed)</h3>",
            html_table(pairs),
        ]
    return "".join(parts)


def _importance_html(
    importances: Mapping[str, Mapping[str, float]],
    objectives: Sequence[tuple[str, str]],
    note: str,
) -> str:
    series = {k: v for k, v in importances.items() if v}
    if not series:
        return _p(note or "No parameter importances were computed.")
    labels = dict(objectives)
    records = [
        {"parameter": p, **{labels.get(k, k): as_float(v.get(p)) for k, v in series.items()}}
        for p in _params_by_importance(series)
    ]
    parts = [html_table(records)]
    svg = importance_chart(series, labels)
    if svg is not None:
        parts.append(charts_html([("Parameter importance per objective", svg)]))
    if note:
        parts.append(_p(note))
    return "".join(parts)


def _trials_html(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    members: set[int],
) -> str:
    objective_keys = {key for key, _ in objectives}
    param_keys: dict[str, None] = {}
    for trial in trials:
        param_keys.update(dict.fromkeys(str(k) for k in search_params(trial)))
    records = []
    for trial in trials:
        params = search_params(trial)
        record: dict[str, Any] = {
            "trial": trial.get("number"),
            "variant": _kind(trial),
            "state": trial.get("state"),
            # Constraints are only judged on completed trials.
            "feasible": ("yes" if _feasible(trial) else "no") if _complete(trial) else None,
            "front": "★"
            if trial.get("number") in members
            else ("noisy latency" if latency_noisy(trial) else ""),
            "stages": trial.get("stages") or ("(baseline)" if trial.get("seed") else ""),
        }
        record.update({label: _cell(trial_value(trial, key)) for key, label in objectives})
        for key in (
            "perplexity_ratio",
            "latency_ratio",
            "latency_ratio_lo",
            "latency_ratio_hi",
            "weight_bytes_ratio",
            "sparsity",
            "bits_per_weight",
        ):
            if key not in objective_keys:
                record[key] = trial_value(trial, key)
        record.update({f"param.{k}": params.get(k) for k in param_keys})
        record["cached from"] = trial.get("cached_from")
        record["seconds"] = as_float(trial.get("seconds"))
        record["worker"] = trial.get("worker")
        records.append(record)
    return html_table(records) + _p(
        "★ = on the Pareto front of all objectives. noisy latency = its latency ratio's 95% "
        "interval stayed wider than the recipe's target, so it is kept off a front or pick "
        "that involves latency until measured again. — = not measured."
    )


def _failed_html(trials: Sequence[Mapping[str, Any]]) -> str:
    esc = html.escape
    head = "".join(f'<th class="text">{h}</th>' for h in ("trial", "variant", "stages", "worker"))
    body = []
    for trial in trials:
        cells = [
            f"#{trial.get('number')}",
            _kind(trial),
            trial.get("stages") or "",
            trial.get("worker"),
        ]
        tds = "".join(f'<td class="text">{esc(format_value(c))}</td>' for c in cells)
        error = trial.get("error") or "(no error message)"
        body.append(
            f'<tr class="failed">{tds}</tr><tr class="failed"><td></td>'
            f'<td class="error" colspan="3">error: {esc(str(error))}</td></tr>'
        )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _rounded(value: Any, digits: int = 6) -> Any:
    """`value` with every float rounded to `digits` significant digits (0.15000000000000002
    -> 0.15), lists and mappings through."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def front_variants_yaml(trials: Sequence[Mapping[str, Any]], analysis: SweepAnalysis) -> str:
    """The front's configurations as recipe `variants:` entries (YAML), one commented block
    each (repeats of a configuration are named in its comment, not listed again), named after
    their seed (a valid variant name: the recipe checks it) or trial; trials without a
    pipeline (the baseline) are listed as comments only."""
    members = set(analysis.distinct)
    repeated = analysis.repeated
    blocks = []
    for trial in trials:
        if trial.get("number") not in members:
            continue
        stages = " ".join(str(trial.get("stages") or "").split())
        comment = f"# trial {trial.get('number')} ({_kind(trial)}): {stages or '(baseline)'}"
        if also := _also(trial.get("number", 0), repeated):
            comment += f"  (repeated by {also})"
        pipeline = _rounded(jsonable(trial.get("pipeline") or []))
        if not pipeline:
            blocks.append(f"{comment}\n#   no pipeline: nothing to paste\n")
            continue
        name = trial.get("seed") or f"trial-{trial.get('number')}"
        entry = [{"name": str(name), "pipeline": pipeline}]
        body = yaml.safe_dump(entry, sort_keys=False, default_flow_style=None, width=96)
        blocks.append(f"{comment}\n{body}")
    return "\n".join(blocks)


def front_plots(trials: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """(title, SVG) pairs: perplexity vs latency ratio and perplexity vs weight MB, each
    skipped when no COMPLETE trial has both metrics."""
    specs = (
        ("Perplexity vs latency", "latency_ratio", "latency (× baseline)", 1.0),
        ("Perplexity vs weight size", "weight_bytes", "weight MB (10⁶ bytes)", _MB),
    )
    charts = []
    for title, x_key, x_label, scale in specs:
        svg = front_plot(
            trials,
            x_key,
            "perplexity",
            title=title,
            x_label=x_label,
            y_label="perplexity",
            x_scale=scale,
        )
        if svg is not None:
            charts.append((title, svg))
    return charts


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
        ("Summary", _summary_html(trials, objectives, constraints, a)),
        (
            "Pareto front plots",
            charts_html(charts)
            + _p(
                "Every COMPLETE trial; the step line is the 2-D front of the feasible ones for "
                "that pair of metrics; circled points are the seeded variants."
            )
            if charts
            else _p("No trial has perplexity with latency ratio or weight bytes: no plots."),
        ),
        ("Pareto front (all objectives)", _front_html(trials, objectives, a)),
        ("Recommendations", _recommendations_html(a.picks)),
        ("Seeded variants vs sampled variants", _seed_html(a.comparison, objectives)),
        ("Parameter importances", _importance_html(importances, objectives, importance_note)),
        ("All trials", _trials_html(trials, objectives, front_set)),
    ]
    if meta.get("notes"):  # what makes the numbers mean less (see compress.sanity)
        items = "".join(f"<li>{html.escape(str(n))}</li>" for n in meta["notes"])
        sections.insert(0, ("Notes", f"<ul>{items}</ul>"))
    if failed:
        sections.append((f"Failed trials ({len(failed)})", _failed_html(failed)))
    sections.append(
        (
            "Front trials as recipe variants",
            (f"<pre>{html.escape(snippet)}</pre>" if snippet else _p("The front is empty."))
            + _p("Paste the entries under a recipe's variants: key."),
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
    "pareto_front",
    "pareto_trials",
    "recommend",
    "seed_comparison",
    "write_sweep_report",
]
