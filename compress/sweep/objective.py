"""The sweep's objective: one trial is one variant, built by the workbench and measured.

    suggest the trial's parameters -> resolve the pipeline -> reuse a finished result with the
    same resolved config (the study's, else this machine's result cache), or build + measure
    it -> the trial's metrics, ratios to the baseline and its attached report

Each worker holds the machine-wide gate (:mod:`compress.gate`) shared while it computes and
exclusive while it times forward passes, so workers on one machine do not disturb each
other's latency. Latency is measured paired: the baseline and the variant in alternating
rounds, and the objective is their ratio, which stays comparable across time and machines.
Trial 0 is the baseline, measured the same way, then the recipe's seeds are queued.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from compress import __version__, gate
from compress.cache import cache_dir, read_entry, stable_hash, write_entry
from compress.metrics import measurement_problem, ratios
from compress.recipe import Recipe, VariantSpec, variant_stages
from compress.report.study import readable, trial_report_html
from compress.report.tables import jsonable
from compress.storage import ARTIFACT_DIR
from compress.sweep.claims import KEY_ATTR
from compress.sweep.progress import Echo
from compress.sweep.space import SweepSpec, defaults, is_active, resolve, scan_seed_assignments
from compress.sweep.study import READY_ATTR, distribution, recorded
from compress.workbench import (
    Workspace,
    build_variant,
    control_perplexity,
    measure_static,
    paired_latency,
    set_control,
    set_latency,
)

log = logging.getLogger(__name__)

ARTIFACT_ATTR_PREFIX = "artifacts:"  # where optuna keeps a trial's artifact metadata
RESULT_FORMAT = 3  # the measured record's keys (compress.metrics); older results are not reused


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Define-by-run: ask for each active parameter in declaration order."""
    values: dict[str, Any] = {}
    for name, p in spec.params.items():
        if not is_active(p.when, values):
            continue
        if p.choice is not None:
            values[name] = trial.suggest_categorical(name, p.choice)
        elif p.float_ is not None:
            d = distribution(p)
            values[name] = trial.suggest_float(name, d.low, d.high, log=p.log, step=p.step)
        else:
            d = distribution(p)
            values[name] = trial.suggest_int(name, d.low, d.high, log=p.log, step=d.step)
    return values


@dataclass
class Worker:
    """What one worker process needs to run trials."""

    recipe: Recipe
    spec: SweepSpec
    ws: Workspace
    out_dir: Path
    worker_id: str
    latency_threads: int
    keep_checkpoints: bool = False
    echo: Echo = print
    progress: bool = False
    base: dict = field(default_factory=dict)  # the baseline trial's metrics (trial 0)
    artifacts: Any = None

    def __post_init__(self) -> None:
        from optuna.artifacts import FileSystemArtifactStore

        art_dir = self.out_dir / ARTIFACT_DIR
        art_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts = FileSystemArtifactStore(str(art_dir))


def config_key(ws: Workspace, pipeline: list[dict]) -> str:
    """What decides a variant's numbers: the baseline (its cache key covers data, tokenizer,
    model and training), the evaluation settings, the seed and the resolved pipeline."""
    recipe = ws.recipe
    return stable_hash(
        {
            "baseline": ws.baseline_info.identity,  # partial and finished baselines differ
            "eval": recipe.eval.model_dump(mode="json"),
            "seed": recipe.seed,
            "pipeline": pipeline,
            # what an `allocation: scan` stage reads; absent (the defaults) keeps older keys
            **({"scan": recipe.scan.model_dump(mode="json")} if recipe.scan is not None else {}),
            # with reference: control, a record also holds the control's numbers
            "reference": recipe.sweep.reference if recipe.sweep is not None else "baseline",
            "compress": __version__,
            "format": RESULT_FORMAT,
        },
        length=24,
    )


def result_path(key: str) -> Path:
    return cache_dir() / "sweep-results" / key[:2] / f"{key}.json"


def earlier_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's finished trials that `failed_before` and `cached_result` look through (one
    read of the storage for both)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))


def cached_result(earlier: list[FrozenTrial], key: str) -> tuple[dict | None, str | None]:
    """A finished measurement of the same resolved config: from the study's `earlier_trials`
    (any machine), else from this machine's result cache."""
    for t in earlier:
        if t.state == TrialState.COMPLETE and t.user_attrs.get(KEY_ATTR) == key:
            metrics = recorded(t, "measured")
            if measurement_problem(metrics) is None:
                return dict(metrics), f"trial {t.number}"
    path = result_path(key)
    data = read_entry(path, "cached sweep result")
    if data is not None:
        try:
            measured = json.loads(data)
        except ValueError as exc:
            measured, problem = None, f"not JSON ({exc})"
        else:
            problem = measurement_problem(measured)
        if problem is None:
            return measured, "cache"
        log.warning("cache: cached sweep result %s is invalid (%s); measuring again", path, problem)
    return None, None


def failed_before(earlier: list[FrozenTrial], key: str) -> tuple[int, str] | None:
    """An earlier trial of the same resolved config that failed for a reason of its own (not
    Ctrl-C, not a killed worker). Its repeats are recorded as pruned, not measured again:
    Optuna's samplers ignore failed trials but learn from pruned ones, so without this a
    sampler can propose a failing configuration over and over."""
    for t in earlier:
        a = t.user_attrs
        if t.state != TrialState.FAIL or a.get(KEY_ATTR) != key:
            continue
        if a.get("error") and not a.get("interrupted"):
            return t.number, str(a["error"])
    return None


def store_result(key: str, measured: dict) -> None:
    write_entry(result_path(key), json.dumps(measured, sort_keys=True).encode())


def measure(w: Worker, number: int, pipeline: list[dict]) -> tuple[dict, dict]:
    """Build the variant and measure it: static metrics under the shared gate, then the
    paired latency (baseline and variant in alternating rounds) under the exclusive gate.
    Returns (measured metrics, details for the trial's attached report)."""
    vdir = w.out_dir / "checkpoints" / f"trial-{number}"
    with gate.computing():
        if pipeline:
            spec = VariantSpec(name=f"trial-{number}", pipeline=pipeline)
            models = {"baseline": w.ws.baseline}
            model, reports = build_variant(w.ws, spec, models, w.progress)
        else:
            model, reports = w.ws.baseline, []
        res = measure_static(w.ws, f"trial-{number}", model, reports, vdir)
        if w.spec.reference == "control" and res.perplexity is not None:
            stages = (
                variant_stages(VariantSpec(name=f"trial-{number}", pipeline=pipeline))
                if pipeline
                else []  # the baseline: its own control
            )
            control = control_perplexity(w.ws, stages, w.progress)
            set_control(res.measurement, res.perplexity, control, w.recipe.seed)
    if not w.keep_checkpoints:
        import shutil

        shutil.rmtree(vdir, ignore_errors=True)
        with contextlib.suppress(OSError):  # another worker's checkpoint may still be there
            vdir.parent.rmdir()
    with gate.exclusive() as waited, w.ws.progress.phase(f"trial-{number}: latency"):
        timings = paired_latency(w.ws, model, w.latency_threads)
    set_latency(res.measurement, timings)
    measured = {
        **res.measurement.to_dict(),
        "latency_threads": w.latency_threads,
        "latency_gate_wait_s": waited,
    }
    details = {
        "stage_reports": [r.to_dict() for r in res.stages],
        "perplexity": res.perplexity.to_dict() if res.perplexity else None,
        "latency": {
            "baseline": timings.baseline.to_dict(),
            "variant": timings.variant.to_dict(),
            **timings.to_dict(),
        },
        "rss": res.rss,
    }
    return measured, details


def with_ratios(measured: dict, base: dict) -> dict:
    """Measured metrics plus their ratios to the baseline's, as a run's report computes them."""
    return {**measured, **ratios(measured, base)}


def objective_values(spec: SweepSpec, metrics: dict) -> list[float]:
    values = []
    for m in spec.objectives:
        v = metrics.get(m)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FloatingPointError(f"objective {m} is {v!r}")
        values.append(float(v))
    return values


def describe(pipeline: list[dict]) -> str:
    """``prune(sparsity=0.5) -> int8``: every setting the trial's pipeline gives, defaults
    included (a run's report shows only non-default settings; in a sweep the values the
    trial chose are the point)."""
    parts = []
    for stage in pipeline:
        ((name, settings),) = stage.items()
        inner = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in (settings or {}).items()
        )
        parts.append(f"{name}({inner})" if inner else name)
    return " -> ".join(parts)


@dataclass
class Variant:
    """A claimed trial's configuration: its resolved pipeline and that pipeline's key."""

    pipeline: list[dict]
    key: str
    start: float  # time.perf_counter() when the trial was claimed


def label(w: Worker, trial: optuna.Trial) -> Variant:
    """Suggest the trial's parameters and record the configuration they make (done while the
    trial is claimed, so that other workers see what it will measure)."""
    start = time.perf_counter()
    values = suggest(trial, w.spec)
    pipeline = resolve(w.spec, values)
    key = config_key(w.ws, pipeline)
    trial.set_user_attr(KEY_ATTR, key)
    record(trial, "pipeline", pipeline)
    trial.set_user_attr("stages", describe(pipeline))
    return Variant(pipeline, key, start)


def run_trial(w: Worker, trial: optuna.Trial, variant: Variant) -> list[float]:
    """Measure the claimed trial (or reuse a result of its configuration) and record it.

    A fresh measurement goes into this machine's result cache before anything is written to
    the trial: if another worker failed the trial meanwhile (its heartbeat went stale), the
    write raises ``UpdateFinishedTrialError`` and the trial's retry reuses the result.
    """
    gate.checkpoint()  # let a worker that waits to time its forward passes go first
    pipeline, key, start = variant.pipeline, variant.key, variant.start
    try:
        earlier = earlier_trials(trial.study)
        if failure := failed_before(earlier, key):
            number, error = failure
            trial.set_user_attr("error", f"not measured again: trial {number} failed ({error})")
            raise optuna.TrialPruned(f"configuration failed in trial {number}")
        measured, source = cached_result(earlier, key)
        details: dict = {}
        if measured is None:
            measured, details = measure(w, trial.number, pipeline)
        metrics = with_ratios(measured, w.base)
        seconds = time.perf_counter() - start
        attrs = {**metrics, "cached_from": source, "seconds": seconds}
        try:
            result, invalid = objective_values(w.spec, metrics), None
        except FloatingPointError as exc:  # NaN: the trial fails, and nothing is cached
            result, invalid = [], exc
        if source is None and invalid is None:
            store_result(key, measured)
        record(trial, "measured", measured)
        for k, v in attrs.items():
            trial.set_user_attr(k, readable(v))
        if invalid is not None:
            raise invalid
    except (optuna.TrialPruned, UpdateFinishedTrialError):
        raise
    except KeyboardInterrupt:
        with contextlib.suppress(UpdateFinishedTrialError):
            trial.set_user_attr("error", "interrupted")
            trial.set_user_attr("interrupted", True)
        raise
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        trial.set_user_attr("seconds", time.perf_counter() - start)
        raise
    attach(w, trial, pipeline, metrics, details, source)
    return result


def record(trial: optuna.Trial, key: str, value: Any) -> None:
    """Keep `value` on the trial as a system attribute: data the sweep reads back (the
    measured record, the resolved pipeline), out of the dashboard's attribute list, which
    shows the same numbers rounded (see :func:`compress.report.study.readable`)."""
    trial.storage.set_trial_system_attr(trial._trial_id, key, jsonable(value))


def report_files(
    w: Worker,
    number: int,
    params: dict,
    pipeline: list[dict],
    metrics: dict,
    details: dict,
    source: str | None,
) -> dict[str, str]:
    """The trial's own report, written into the artifact store as ``trial-N-report.html``
    (readable) and ``trial-N-record.json`` (every number unrounded, for scripts); returns the
    system attributes that attach them to a trial (optuna's artifact metadata)."""
    from dataclasses import asdict

    from optuna.artifacts import ArtifactMeta

    note = f"Reused the result of {source}." if source else ""
    page = trial_report_html(
        f"Trial {number}" + ("" if pipeline else ": the baseline"),
        describe(pipeline),
        {k: readable(v) for k, v in params.items()},
        {k: readable(v) for k, v in metrics.items()},
        details,
        note,
    )
    doc = {
        "trial": number,
        "params": params,
        "pipeline": pipeline,
        "metrics": metrics,
        "cached_from": source,
        "details": details,
    }
    files = [
        (f"trial-{number}-report.html", page.encode(), "text/html"),
        (
            f"trial-{number}-record.json",
            json.dumps(jsonable(doc), indent=1, sort_keys=True).encode(),
            "application/json",
        ),
    ]
    attrs = {}
    for filename, data, mimetype in files:
        artifact_id = str(uuid.uuid4())
        w.artifacts.write(artifact_id, io.BytesIO(data))
        meta = ArtifactMeta(artifact_id, filename, mimetype, None)
        attrs[ARTIFACT_ATTR_PREFIX + artifact_id] = json.dumps(asdict(meta))
    return attrs


def attach(
    w: Worker,
    trial: optuna.Trial,
    pipeline: list[dict],
    metrics: dict,
    details: dict,
    source: str | None,
) -> None:
    """The trial's own report, attached as Optuna artifacts the dashboard lists."""
    try:
        attrs = report_files(w, trial.number, trial.params, pipeline, metrics, details, source)
        for key, value in attrs.items():
            trial.storage.set_trial_system_attr(trial._trial_id, key, value)
    except Exception as exc:  # the numbers are in user attrs already
        log.warning("trial %d: could not attach its report: %s", trial.number, exc)


def scan_seeds(w: Worker, echo: Echo) -> dict[str, dict[str, Any]]:
    """Trials built from the baseline's sensitivity scan (measured now, or cached; the
    trials that allocate by it read the same cached scan)."""
    from compress.scan.workspace import scan_workspace

    echo("scan: measuring per-layer sensitivity for the scan seeds")
    result = scan_workspace(w.ws, echo=echo if w.progress else None)
    sparsities = [c["sparsity"] for c in result.prune_settings()]
    seeds = scan_seed_assignments(w.spec, sparsities)
    echo(f"scan: {len(seeds)} seed(s): {', '.join(seeds) or 'none in the space'}")
    return seeds


def initialize(study: optuna.Study, w: Worker, echo: Echo) -> None:
    """Trial 0 is the baseline; then the recipe's seeds are queued in order."""
    spec = w.spec
    base_values = defaults(spec)
    if not any(t.number == 0 for t in study.get_trials(deepcopy=False)):
        echo("trial 0: measuring the baseline")
        start = time.perf_counter()
        measured, details = measure(w, 0, [])
        metrics = with_ratios(measured, measured)
        metrics["latency_ratio"] = 1.0  # the reference of every paired ratio
        attrs = {
            **metrics,
            "seed": "baseline",
            "stages": "",
            "config_key": config_key(w.ws, []),
            "worker": w.worker_id,
            "cached_from": None,
            "seconds": time.perf_counter() - start,
        }
        try:  # a finished trial takes no upload: its report goes in as it is created
            files = report_files(w, 0, base_values, [], metrics, details, None)
        except Exception as exc:  # the numbers are in user attrs already
            log.warning("trial 0: could not attach its report: %s", exc)
            files = {}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=objective_values(spec, metrics),
                params=base_values,
                distributions={k: distribution(spec.params[k]) for k in base_values},
                user_attrs={k: readable(v) for k, v in attrs.items()},
                system_attrs={"measured": jsonable(measured), "pipeline": [], **files},
            )
        )
        store_result(attrs["config_key"], measured)
    for name, given in spec.seeds.items():
        study.enqueue_trial(defaults(spec, given), user_attrs={"seed": name}, skip_if_exists=True)
    if spec.scan_seeds:
        for name, values in scan_seeds(w, echo).items():
            study.enqueue_trial(values, user_attrs={"seed": name}, skip_if_exists=True)
    study.set_user_attr(READY_ATTR, True)
