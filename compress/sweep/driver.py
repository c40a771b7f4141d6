"""Run a sweep end to end and write its report from the study.

:func:`run_sweep` is what ``python -m compress.run RECIPE`` does for such a recipe: open or
create the study, put in the baseline (trial 0) and the seed variants, run workers until the
study has ``sweep.trials`` completed trials, and write the report from the study.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from compress import atomic, gate
from compress.recipe import Recipe
from compress.report.study import save_note
from compress.report.sweep import METRIC_KEYS, SweepAnalysis, analyse, write_sweep_report
from compress.storage import ARTIFACT_DIR, SWEEP_FILE, absolute_sqlite, mask_url, sign_pointer
from compress.sweep.claims import REASON_ATTR, claim_lock, release_dead, requeue_interrupted
from compress.sweep.objective import Worker, initialize
from compress.sweep.progress import Echo
from compress.sweep.runner import WorkerArgs, WorkerExit, run_worker, spawn_workers
from compress.sweep.space import METRICS, SweepSpec, default_recommendations
from compress.sweep.study import (
    INIT_ATTR,
    READY_ATTR,
    SweepError,
    count,
    feasible,
    open_storage,
    open_study,
    recorded,
    storage_url,
    study_name,
)

log = logging.getLogger(__name__)

__all__ = ["SweepError", "SweepOutcome", "collect_trials", "importances", "run_sweep"]


@dataclass
class SweepOutcome:
    study: optuna.Study
    trials: list[dict]
    storage: str
    paths: dict[str, Path]
    seconds: float
    ran: int  # trials finished by this invocation
    interrupted: bool
    failed_workers: list[str]  # local workers that stopped with an error: who, how, last error
    analysis: SweepAnalysis  # the report's front, repeats and recommendations


def collect_trials(study: optuna.Study, spec: SweepSpec) -> list[dict]:
    """Every trial as a flat record (the report's input), ordered by number."""
    trials = study.get_trials(deepcopy=False)
    retries = {
        t.system_attrs["failed_trial"]: t
        for t in trials
        if isinstance(t.system_attrs.get("failed_trial"), int)
    }
    out = []
    for t in trials:
        a = dict(t.user_attrs)
        error = a.get("error")
        retry = retries.get(t.number)
        if t.state == TrialState.FAIL and not error:
            reason = retry.system_attrs.get(REASON_ATTR) if retry else None
            error = reason or "worker stopped heartbeating (killed?)"
        if t.state == TrialState.FAIL and retry is not None:
            error = f"{error}; queued again as trial {retry.number}"
        record = {
            "number": t.number,
            "state": t.state.name,
            "seed": a.get("seed"),
            "params": dict(t.params),
            "stages": a.get("stages", ""),
            "pipeline": recorded(t, "pipeline") or [],
            "values": dict(zip(spec.objectives, t.values)) if t.values else None,
            "feasible": feasible(spec, a) if t.state == TrialState.COMPLETE else False,
            "error": error,
            "cached_from": a.get("cached_from"),
            "seconds": a.get("seconds"),
            "worker": a.get("worker"),
            "config_key": a.get("config_key"),
        }
        record.update({key: a.get(key) for key in METRIC_KEYS})
        out.append(record)
    return out


def importances(
    study: optuna.Study, spec: SweepSpec, complete: int
) -> tuple[dict[str, dict[str, float]], str]:
    """fANOVA importance of each parameter for each objective, over the `complete` completed
    trials and the parameters that all of them have (Optuna's rule for conditional spaces)."""
    if complete < 4:
        return {}, f"needs at least 4 completed trials, the study has {complete}"
    out: dict[str, dict[str, float]] = {}
    note = ""
    for i, metric in enumerate(spec.objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study,
                    target=(lambda t, i=i: t.values[i]),
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                )
            out[metric] = {k: float(v) for k, v in imp.items()}
        except (RuntimeError, ValueError) as exc:
            note = f"not computed: {exc}"
    if not any(out.values()):
        note = note or "no parameter is shared by all completed trials"
    conditional = [n for n, p in spec.params.items() if p.when]
    if conditional and out:
        left_out = f"conditional parameters ({', '.join(conditional)}) are left out: "
        note = (note + " " if note else "") + left_out + "not every trial has them."
    return out, note


def _recipe_text(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)


def write_report(
    study: optuna.Study, recipe: Recipe, out_dir: Path, storage: str, meta: dict
) -> tuple[list[dict], dict[str, Path], SweepAnalysis]:
    from compress.evaluate import DEFINITIONS
    from compress.workbench import environment

    spec = recipe.sweep
    assert spec is not None
    trials = collect_trials(study, spec)
    complete = sum(t["state"] == TrialState.COMPLETE.name for t in trials)
    imp, note = importances(study, spec, complete)
    objectives = [(m, METRICS[m]) for m in spec.objectives]
    recommendations = [r.model_dump() for r in default_recommendations(spec)]
    analysis = analyse(trials, objectives, recommendations)
    definitions = {
        **DEFINITIONS,
        "latency_ratio": "median forward latency of the variant divided by the baseline's, both "
        "timed in alternating rounds in the same measurement (paired), with every other "
        "compress worker on the machine paused (machine-wide gate)",
        "trial": "one variant: the pipeline template filled in with the trial's parameters; "
        "trial 0 is the baseline, then the recipe's seeds, then the sampler's proposals",
        "cached_from": "the trial's numbers were reused from an earlier trial (or this "
        "machine's result cache) with the same resolved configuration, not measured again",
    }
    paths = write_sweep_report(
        out_dir,
        trials,
        name=study.study_name,
        objectives=objectives,
        constraints=[c.model_dump() for c in spec.constraints],
        recommendations=recommendations,
        importances=imp,
        importance_note=note,
        recipe_text=_recipe_text(recipe),
        meta={**meta, "storage": mask_url(storage), "study": study.study_name},
        definitions=definitions,
        environment=environment(),
        analysis=analysis,
    )
    return trials, paths, analysis


def write_pointer(out_dir: Path, storage: str, name: str) -> Path:
    """``sweep.json``: where the study lives, for ``python -m compress.dashboard <dir>``. A
    password in the URL is recorded masked (the dashboard then uses PGPASSWORD or .pgpass):
    a report folder gets shared, a database password must not travel with it. The file is
    signed with this user's key, so the dashboard connects to a recorded database host only
    for a pointer written here; it is replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SWEEP_FILE
    doc = {"storage": mask_url(storage), "study_name": name, "artifact_dir": ARTIFACT_DIR}
    atomic.write_text(path, json.dumps(sign_pointer(doc), indent=1) + "\n")
    return path


def release(study: optuna.Study, rdb: RDBStorage, echo: Echo) -> None:
    """Fail the running trials whose worker is dead (a stale heartbeat, or a process of this
    machine that is gone) and queue each again with the same parameters."""
    with claim_lock(rdb, study._study_id):
        for released in release_dead(study, rdb):
            echo(released.line())


def run_sweep(
    recipe: Recipe,
    recipe_path: Path,
    out_dir: Path,
    *,
    storage: str | None = None,
    study: str | None = None,
    workers: int = 1,
    progress: bool = False,
    verbose: bool = False,
    keep_checkpoints: bool = False,
    echo: Echo = print,
) -> SweepOutcome:
    from compress.workbench import prepare

    spec = recipe.sweep
    assert spec is not None
    start = time.perf_counter()
    url = absolute_sqlite(storage_url(recipe, out_dir, storage))
    name = study_name(recipe, study)
    rdb = open_storage(url, spec)
    gate.install(gate.MachineGate())
    latency_threads = recipe.eval.latency.threads or torch.get_num_threads()
    interrupted = False
    failed_workers: list[str] = []
    ws = None
    before = 0
    opened = False
    try:
        ws = prepare(recipe, recipe_path.resolve().parent, progress=progress)
        ws.progress.keep = False  # a trial's phases are shown while they run; its line stays
        echo(ws.baseline_info.headline())
        sampler_probe = optuna.samplers.RandomSampler()
        st, created = open_study(rdb, name, recipe, ws, sampler_probe)
        opened = True
        write_pointer(out_dir, url, name)  # only once the study accepted this recipe
        echo(
            f"study {name!r} in {mask_url(url)}: "
            + ("created" if created else f"resumed with {len(st.trials)} trials")
        )
        before = count(st, TrialState.COMPLETE, TrialState.FAIL)
        if not st.user_attrs.get(READY_ATTR):
            started = st.user_attrs.get(INIT_ATTR, 0)
            if created or (not st.trials and time.time() - float(started or 0) > 120):
                w = Worker(
                    recipe, spec, ws, out_dir, "init", latency_threads, keep_checkpoints, echo
                )
                initialize(st, w, echo)
        release(st, rdb, echo)
        if n := requeue_interrupted(st):
            echo(f"queued {n} interrupted trial(s) again")
        done = count(st, TrialState.COMPLETE)
        if done >= spec.trials:
            echo(f"the study already has {done} completed trials (sweep.trials {spec.trials})")
        elif workers <= 1:
            run_worker(
                recipe,
                ws,
                rdb,
                name,
                out_dir,
                0,
                created,
                latency_threads,
                echo,
                progress,
                keep_checkpoints,
            )
        else:
            compute_threads = max(1, (os.cpu_count() or 1) // workers)
            echo(
                f"starting {workers} workers ({compute_threads} compute thread(s) each; "
                f"latency timed alone with {latency_threads} threads)"
            )

            def on_exit(ended: WorkerExit, st: optuna.Study = st) -> None:
                if ended.failed:  # its trial need not wait for the heartbeat to go stale
                    echo(ended.describe())
                    release(st, rdb, echo)

            exits = spawn_workers(
                [
                    WorkerArgs(
                        str(recipe_path),
                        str(out_dir),
                        url,
                        name,
                        i,
                        workers,
                        compute_threads,
                        latency_threads,
                        False,
                        verbose,
                        keep_checkpoints,
                    )
                    for i in range(workers)
                ],
                echo,
                on_exit,
            )
            failed_workers = [e.describe() for e in exits if e.failed]
            interrupted = any(e.code == 130 for e in exits)
    except KeyboardInterrupt:
        interrupted = True
        if not opened:
            raise
    finally:
        gate.install(None)
    st = optuna.load_study(study_name=name, storage=rdb)
    if opened:  # a trial of a worker that died late in the sweep: failed and queued again
        release(st, rdb, echo)
    seconds = time.perf_counter() - start
    ran = count(st, TrialState.COMPLETE, TrialState.FAIL) - before
    meta = {
        "recipe": recipe.name,
        "baseline": None
        if ws is None
        else {
            "key": ws.baseline_info.key,
            "cached": ws.baseline_info.cached,
            "description": ws.baseline_info.description,
            # how its training ended (steps, stopped_by, seconds): a capped baseline is weaker
            "train": None
            if ws.baseline_info.train is None
            else {k: v for k, v in ws.baseline_info.train.items() if k != "history"},
        },
        "unigram_perplexity": None if ws is None else ws.unigram_perplexity,
        "notes": []
        if ws is None
        else _notes(st, ws.corpus.notes, ws.unigram_perplexity, recipe.eval.perplexity.split),
        "workers": workers,
        "seconds": seconds,
        "interrupted": interrupted,
        "failed_workers": failed_workers,
    }
    trials, paths, analysis = write_report(st, recipe, out_dir, url, meta)
    outcome = SweepOutcome(
        st, trials, url, paths, seconds, ran, interrupted, failed_workers, analysis
    )
    if opened:
        save_note(st, sweep_note(outcome, spec))
    rdb.engine.dispose()
    return outcome


def sweep_note(outcome: SweepOutcome, spec: SweepSpec) -> str:
    """The study's note on the dashboard (markdown): the sweep's summary as the terminal
    printed it (counts, the Pareto front, the recommendations) and where the report is."""
    return "\n".join(
        [
            "## Summary",
            "",
            "```text",
            summary(outcome, spec),
            "```",
            "",
            f"The sweep's report: `{outcome.paths['html']}` (every trial in "
            f"`{outcome.paths['csv'].name}`); each trial's own report is attached to it as "
            "`trial-N-report.html`.",
        ]
    )


def _notes(
    study: optuna.Study, corpus_notes: tuple[str, ...], unigram: float, split: str
) -> list[str]:
    """What makes the sweep's numbers mean less (each also a warning in the terminal): the
    corpus's notes, and a baseline (trial 0) no better than the unigram model."""
    from compress.sanity import baseline_note

    notes = list(corpus_notes)
    base = next(iter(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))), None)
    ppl = base.user_attrs.get("perplexity") if base is not None and base.number == 0 else None
    if note := baseline_note(ppl, unigram, split):
        log.warning("%s", note)
        notes.append(note)
    return notes


def summary(outcome: SweepOutcome, spec: SweepSpec) -> str:
    """Plain-text summary for the terminal: counts, the front, the recommendations."""
    trials = outcome.trials
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    reused = sum(1 for t in trials if t["state"] == "COMPLETE" and t.get("cached_from"))
    lines = [
        f"study {outcome.study.study_name!r}: "
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        + f" ({reused} reused, {outcome.ran} finished in this run, {outcome.seconds:.0f} s)"
    ]
    done = states.get("COMPLETE", 0)
    if done < spec.trials and not outcome.interrupted and not outcome.failed_workers:
        failed = sum(
            1
            for t in trials
            if t["state"] in ("FAIL", "PRUNED")
            and not str(t.get("error") or "").startswith("interrupted")
        )
        why = (
            f"sweep.max_failures, {failed} failed"
            if failed >= (spec.max_failures or spec.trials) or not spec.timeout_minutes
            else f"sweep.timeout_minutes {spec.timeout_minutes:g}"
        )
        lines.append(
            f"stopped by {why} at {done} of {spec.trials} completed trials: "
            "run the same command again to continue"
        )
    front = outcome.analysis.front
    by_number = {t["number"]: t for t in trials}
    firsts = outcome.analysis.distinct  # a configuration may recur as reused trials
    lines.append(
        f"Pareto front ({len(firsts)} configurations in {len(front)} trials; "
        f"objectives: {', '.join(spec.objectives)}):"
    )
    for n in firsts:
        t = by_number[n]
        vals = "  ".join(_short(m, t.get(m)) for m in spec.objectives)
        who = t.get("seed") or "sampled"
        lines.append(f"  trial {n:>3} [{who}] {vals}  {t.get('stages') or 'baseline'}")
    recs = outcome.analysis.picks
    if recs:
        lines.append("recommended:")
        for r in recs:
            pick = (
                f"trial {r['trial']} ({r['stages'] or 'baseline'}), "
                f"{_short(r['minimize'], r['value'])}, perplexity {r['perplexity']:.2f}"
                if r["trial"] is not None
                else r["note"]
            )
            lines.append(f"  {r['name']}: {pick}")
    return "\n".join(lines)


def _short(metric: str, value: object) -> str:
    if not isinstance(value, (int, float)):
        return f"{metric} -"
    if metric.endswith("bytes"):
        return f"{metric} {value / 1e6:.2f} MB"
    if metric.endswith("ratio"):
        return f"{metric} {value:.3f}x"
    return f"{metric} {value:.2f}"
