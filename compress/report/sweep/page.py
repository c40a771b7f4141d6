"""The sections of a sweep's `report.html`, each an HTML string: the summary, the Pareto front,
the recommendations, seeded against sampled variants, parameter importances, all trials and the
failed ones; and the front's configurations as recipe `variants:` entries (YAML) to paste.

They are built from the trial records and their `SweepAnalysis` (`analysis`), with the tables
and charts of the per-run report (`compress.report.html`); `write_sweep_report` puts them on
the page.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from compress.metrics import as_float, ratio
from compress.report.html import charts_html, format_value, html_table
from compress.report.sweep.analysis import (
    SweepAnalysis,
    is_complete,
    is_feasible,
    latency_noisy,
    recommend,
    search_params,
    trial_value,
)
from compress.report.sweep.plots import importance_chart, params_by_importance
from compress.report.tables import jsonable

_STATES: tuple[str, ...] = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


# ---------------------------------------------------------------- trial records in tables


def _kind(trial: Mapping[str, Any]) -> str:
    seed = trial.get("seed")
    return f"seed: {seed}" if seed is not None else "sampled"


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


# ---------------------------------------------------------------- HTML pieces


def caption(text: str) -> str:
    """`text`, escaped, as a caption paragraph."""
    return f'<p class="caption">{html.escape(text)}</p>'


def summary_html(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    constraints: Sequence[Mapping[str, Any]],
    analysis: SweepAnalysis,
) -> str:
    """The Summary section: trial counts, constraints and the best trial per objective."""
    states = Counter(str(t.get("state")) for t in trials)
    order = [s for s in _STATES if s in states] + sorted(s for s in states if s not in _STATES)
    cached = [t for t in trials if t.get("cached_from")]
    seconds = sum(as_float(t.get("seconds")) or 0.0 for t in trials if not t.get("cached_from"))
    infeasible = sum(1 for t in trials if is_complete(t) and not is_feasible(t))
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
        + caption(
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


def front_html(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    analysis: SweepAnalysis,
) -> str:
    """The front section: each front configuration once, with its objectives vs the baseline."""
    if not analysis.front:
        return caption("No trial is on the front: no COMPLETE, feasible trial has every objective.")
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
    return html_table(records) + caption(
        f"Non-dominated COMPLETE, feasible trials over all objectives ({labels}), each "
        "configuration once: 'repeated by' lists later trials of the same configuration, "
        "whose numbers were reused. × baseline = value / the baseline trial's value (not "
        "repeated for objectives that are already ratios to the baseline)."
    )


def recommendations_html(picks: Sequence[Mapping[str, Any]]) -> str:
    """The Recommendations section: one row per pick of `recommend`."""
    if not picks:
        return caption("No recommendations were asked for.")
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
    return html_table(records) + caption(
        "The pick is the COMPLETE, feasible trial meeting every maximum with the smallest "
        "minimised value (ties: lower perplexity). A trial whose latency ratio is noisy (its "
        "95% interval wider than the recipe's target) is never picked by a latency criterion "
        "until it is measured again."
    )


def seed_html(
    comparison: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]
) -> str:
    """The seeded vs sampled section from `seed_comparison`: status per seed, then who beat it."""
    if not comparison:
        return caption("No seeded trials.")
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
        caption(
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


def importance_html(
    importances: Mapping[str, Mapping[str, float]],
    objectives: Sequence[tuple[str, str]],
    note: str,
) -> str:
    """The importances section: a table and a chart, or `note` when there are none."""
    series = {k: v for k, v in importances.items() if v}
    if not series:
        return caption(note or "No parameter importances were computed.")
    labels = dict(objectives)
    records = [
        {"parameter": p, **{labels.get(k, k): as_float(v.get(p)) for k, v in series.items()}}
        for p in params_by_importance(series)
    ]
    parts = [html_table(records)]
    svg = importance_chart(series, labels)
    if svg is not None:
        parts.append(charts_html([("Parameter importance per objective", svg)]))
    if note:
        parts.append(caption(note))
    return "".join(parts)


def trials_html(
    trials: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    members: set[int],
) -> str:
    """The All trials section: one row per trial, front members starred."""
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
            "feasible": ("yes" if is_feasible(trial) else "no") if is_complete(trial) else None,
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
    return html_table(records) + caption(
        "★ = on the Pareto front of all objectives. noisy latency = its latency ratio's 95% "
        "interval stayed wider than the recipe's target, so it is kept off a front or pick "
        "that involves latency until measured again. — = not measured."
    )


def failed_html(trials: Sequence[Mapping[str, Any]]) -> str:
    """The failed trials section: each trial with its error message below it."""
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


# ---------------------------------------------------------------- the front as recipe variants


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
