"""Run a recipe's sweep: an Optuna study whose trials are variants built by the workbench.

    open the study (SQLite in the report folder, or any SQLAlchemy URL such as PostgreSQL)
    the first worker: baseline -> trial 0, seed variants queued as the next trials
    every worker: ask -> resolve the pipeline -> reuse a finished result with the same
                  resolved config, or build + measure it -> tell; until `trials` complete
    the report reads every trial back from the study

Each worker holds the machine-wide gate (:mod:`compress.gate`) shared while it computes and
exclusive while it times forward passes, so workers on one machine do not disturb each
other's latency. Latency is measured paired: the baseline and the variant in alternating
rounds, and the objective is their ratio, which stays comparable across time and machines.
A worker killed mid-trial stops heartbeating; its trial is failed and queued again once the
grace period passes. Ctrl-C fails the running trial with reason "interrupted", and the worker
queues it again before it exits. On SQLite every transaction begins IMMEDIATE, so two workers
never claim the same queued trial (see open_storage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from compress import __version__, gate
from compress.cache import cache_dir, stable_hash
from compress.errors import CompressError
from compress.metrics import ratios
from compress.recipe import Recipe, VariantSpec
from compress.report.tables import jsonable
from compress.storage import ARTIFACT_DIR, mask_url
from compress.sweep.space import ParamSpec, SweepSpec, defaults, is_active, resolve
from compress.workbench import (
    Workspace,
    build_variant,
    measure_static,
    paired_latency,
    set_latency,
)

log = logging.getLogger(__name__)

RESULT_FORMAT = 2  # the measured record's keys (compress.metrics); older results are not reused
STUDY_ATTR = "compress"  # study user attr: recipe, baseline key, space hash, objectives
READY_ATTR = "compress_ready"  # set once trial 0 and the seeds are in
INIT_ATTR = "compress_init_started"
Echo = Callable[[str], None]


class SweepError(CompressError):
    """A sweep cannot start or join (storage unreachable, study of another recipe, ...)."""


# ---------------------------------------------------------------------------------------------
# Storage, study, sampler


def storage_url(recipe: Recipe, out_dir: Path, override: str | None = None) -> str:
    url = override or (recipe.sweep.storage if recipe.sweep else None)
    if url:
        return os.path.expandvars(url)
    return f"sqlite:///{(out_dir / 'sweep.db').resolve().as_posix()}"


def study_name(recipe: Recipe, override: str | None = None) -> str:
    return override or (recipe.sweep.study if recipe.sweep and recipe.sweep.study else recipe.name)


def open_storage(url: str, spec: SweepSpec) -> RDBStorage:
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict[str, Any] = {}
    if sqlite:
        # isolation_level None: the sqlite3 driver leaves BEGIN to us (see _serialize_sqlite)
        engine_kwargs["connect_args"] = {"timeout": 120, "isolation_level": None}
        Path(url.split("///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs["pool_pre_ping"] = True
    from sqlalchemy.exc import IntegrityError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=spec.heartbeat.interval,
                    grace_period=spec.heartbeat.grace,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                )
            if sqlite:
                _serialize_sqlite(storage.engine)
            return storage
        except IntegrityError:
            # another worker is creating the tables of a fresh database at the same moment
            if attempt == 4:
                raise SweepError(
                    f"storage {mask_url(url)}: cannot create Optuna's tables"
                ) from None
            time.sleep(1 + attempt)
        except ModuleNotFoundError as exc:
            hint = " (pip install 'compress[postgres]')" if "psycopg" in str(exc) else ""
            raise SweepError(f"storage {mask_url(url)}: missing driver: {exc}{hint}") from None
        except Exception as exc:
            raise SweepError(
                f"storage {mask_url(url)}: cannot open: {type(exc).__name__}: {exc}"
            ) from None
    raise AssertionError("unreachable")


def _serialize_sqlite(engine: Any) -> None:
    """Start every SQLite transaction with ``BEGIN IMMEDIATE``.

    Optuna claims a queued trial by reading it ``FOR UPDATE`` and setting it RUNNING if it is
    still WAITING. SQLite ignores ``FOR UPDATE``, and Python's sqlite3 driver does not even
    begin a transaction before a SELECT, so two workers can both read WAITING and both run
    the trial (seen here: 4 processes popping 200 queued trials ran 22-35 of them twice).
    ``BEGIN IMMEDIATE`` takes SQLite's write lock for the whole read-then-write, so claims
    are serialized; waiting for the lock is bounded by the connection's busy timeout.
    PostgreSQL honours ``FOR UPDATE`` and needs none of this.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listener start fresh


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    cfunc = constraints_func(spec) if spec.constraints else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if spec.sampler.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if spec.sampler.name == "nsga2":
            return optuna.samplers.NSGAIISampler(
                population_size=spec.sampler.population, seed=seed, constraints_func=cfunc
            )
        return optuna.samplers.TPESampler(
            n_startup_trials=spec.sampler.startup_trials,
            multivariate=True,
            group=True,  # conditional parameters: model each group of co-occurring ones
            constant_liar=True,  # running trials count as pessimistic, so workers spread out
            seed=seed,
            constraints_func=cfunc,
        )


def violations(spec: SweepSpec, attrs: dict) -> list[float]:
    """How far a trial's metrics (its user attrs) exceed each constraint, by Optuna's
    convention: a value <= 0 means the constraint holds; a missing metric violates it."""
    out = []
    for c in spec.constraints:
        value = attrs.get(c.metric)
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        out.append(float(value) - c.max if ok else 1e30)
    return out


def constraints_func(spec: SweepSpec) -> Callable[[FrozenTrial], list[float]]:
    return lambda trial: violations(spec, trial.user_attrs)


def feasible(spec: SweepSpec, attrs: dict) -> bool:
    return all(v <= 0 for v in violations(spec, attrs))


def distribution(p: ParamSpec) -> BaseDistribution:
    if p.choice is not None:
        return CategoricalDistribution(p.choice)
    if p.float_ is not None:
        low, high = p.float_
        return FloatDistribution(low, p.corners()[-1], log=p.log, step=p.step)
    low, high = p.int_  # type: ignore[misc]
    return IntDistribution(low, high, log=p.log, step=int(p.step or 1))


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


def space_hash(spec: SweepSpec) -> str:
    return stable_hash(
        {
            "params": {k: v.model_dump(mode="json") for k, v in spec.params.items()},
            "pipeline": spec.pipeline,
            "objectives": spec.objectives,
        }
    )


# ---------------------------------------------------------------------------------------------
# Per-trial work


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
            "baseline": ws.baseline_info.key,
            "eval": recipe.eval.model_dump(mode="json"),
            "seed": recipe.seed,
            "pipeline": pipeline,
            "compress": __version__,
            "format": RESULT_FORMAT,
        },
        length=24,
    )


def _result_path(key: str) -> Path:
    return cache_dir() / "sweep-results" / key[:2] / f"{key}.json"


def earlier_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's finished trials that `failed_before` and `cached_result` look through (one
    read of the storage for both)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))


def cached_result(earlier: list[FrozenTrial], key: str) -> tuple[dict | None, str | None]:
    """A finished measurement of the same resolved config: from the study's `earlier_trials`
    (any machine), else from this machine's result cache."""
    for t in earlier:
        if t.state == TrialState.COMPLETE and t.user_attrs.get("config_key") == key:
            metrics = t.user_attrs.get("measured")
            if isinstance(metrics, dict):
                return dict(metrics), f"trial {t.number}"
    path = _result_path(key)
    if path.is_file():
        try:
            return json.loads(path.read_text()), "cache"
        except (OSError, ValueError):
            log.warning("ignoring unreadable result cache %s", path)
    return None, None


def failed_before(earlier: list[FrozenTrial], key: str) -> tuple[int, str] | None:
    """An earlier trial of the same resolved config that failed for a reason of its own (not
    Ctrl-C, not a killed worker). Its repeats are recorded as pruned, not measured again:
    Optuna's samplers ignore failed trials but learn from pruned ones, so without this a
    sampler can propose a failing configuration over and over."""
    for t in earlier:
        a = t.user_attrs
        if t.state != TrialState.FAIL or a.get("config_key") != key:
            continue
        if a.get("error") and not a.get("interrupted"):
            return t.number, str(a["error"])
    return None


def _store_result(key: str, measured: dict) -> None:
    path = _result_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(measured, sort_keys=True))
    os.replace(tmp, path)


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
    if not w.keep_checkpoints:
        import shutil

        shutil.rmtree(vdir, ignore_errors=True)
        with contextlib.suppress(OSError):  # another worker's checkpoint may still be there
            vdir.parent.rmdir()
    with gate.exclusive() as waited:
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


def run_trial(w: Worker, trial: optuna.Trial) -> list[float]:
    gate.checkpoint()  # let a worker that waits to time its forward passes go first
    start = time.perf_counter()
    trial.set_user_attr("worker", w.worker_id)
    try:
        values = suggest(trial, w.spec)
        pipeline = resolve(w.spec, values)
        key = config_key(w.ws, pipeline)
        trial.set_user_attr("config_key", key)
        trial.set_user_attr("pipeline", pipeline)
        trial.set_user_attr("stages", describe(pipeline))
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
        attrs = {**metrics, "measured": measured, "cached_from": source, "seconds": seconds}
        for k, v in attrs.items():
            trial.set_user_attr(k, jsonable(v))
        result = objective_values(w.spec, metrics)  # raises on NaN: the trial fails
        if source is None:
            _store_result(key, measured)
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        trial.set_user_attr("error", "interrupted")
        trial.set_user_attr("interrupted", True)
        raise
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        trial.set_user_attr("seconds", time.perf_counter() - start)
        raise
    _attach(w, trial, pipeline, metrics, details, source)
    return result


def _attach(
    w: Worker,
    trial: optuna.Trial | optuna.Study,
    pipeline: list[dict],
    metrics: dict,
    details: dict,
    source: str | None,
    storage: Any = None,
) -> None:
    """The trial's own report, attached as an Optuna artifact the dashboard lists."""
    from optuna.artifacts import upload_artifact

    number = getattr(trial, "number", 0)  # the study stands for trial 0, the baseline
    doc = {
        "trial": number,
        "params": getattr(trial, "params", {}),
        "pipeline": pipeline,
        "metrics": metrics,
        "cached_from": source,
        "details": details,
    }
    path = w.out_dir / ARTIFACT_DIR / f".trial-{number}-{os.getpid()}.json"
    try:
        path.write_text(json.dumps(jsonable(doc), indent=1, sort_keys=True))
        upload_artifact(
            artifact_store=w.artifacts,
            file_path=str(path),
            study_or_trial=trial,
            storage=storage,
            mimetype="application/json",
        )
    except Exception as exc:  # the numbers are in user attrs already
        log.warning("trial %d: could not attach its report: %s", number, exc)
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Study setup: trial 0 and seeds


def _compress_attrs(recipe: Recipe, ws: Workspace, spec: SweepSpec) -> dict:
    return {
        "recipe": recipe.name,
        "baseline_key": ws.baseline_info.key,
        "space_hash": space_hash(spec),
        "objectives": spec.objectives,
        "eval": recipe.eval.model_dump(mode="json"),
    }


def open_study(
    storage: RDBStorage, name: str, recipe: Recipe, ws: Workspace, sampler: Any
) -> tuple[optuna.Study, bool]:
    spec = recipe.sweep
    assert spec is not None
    mine = _compress_attrs(recipe, ws, spec)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            directions=["minimize"] * len(spec.objectives),
        )
        created = True
        study.set_user_attr(STUDY_ATTR, mine)
        study.set_user_attr(INIT_ATTR, time.time())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.objectives))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    if not created:
        theirs = study.user_attrs.get(STUDY_ATTR)
        for _ in range(20):  # the creator sets it right after creating the study
            if isinstance(theirs, dict):
                break
            time.sleep(0.5)
            theirs = optuna.load_study(study_name=name, storage=storage).user_attrs.get(STUDY_ATTR)
        if not isinstance(theirs, dict):
            raise SweepError(f"study {name!r} exists but was not created by a compress sweep")
        for key in ("baseline_key", "space_hash", "objectives", "eval"):
            if theirs.get(key) != mine[key]:
                raise SweepError(
                    f"study {name!r} was created with a different {key.replace('_', ' ')} "
                    f"({theirs.get(key)} vs {mine[key]}); use another study name "
                    "(sweep.study or --study) or the same recipe"
                )
    return study, created


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
            "measured": measured,
            "seed": "baseline",
            "pipeline": [],
            "stages": "",
            "config_key": config_key(w.ws, []),
            "worker": w.worker_id,
            "cached_from": None,
            "seconds": time.perf_counter() - start,
        }
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=objective_values(spec, metrics),
                params=base_values,
                distributions={k: distribution(spec.params[k]) for k in base_values},
                user_attrs={k: jsonable(v) for k, v in attrs.items()},
            )
        )
        _store_result(attrs["config_key"], measured)
        # a finished trial takes no artifact, so the baseline's report is the study's
        _attach(w, study, [], metrics, details, None)
    for name, given in spec.seeds.items():
        study.enqueue_trial(defaults(spec, given), user_attrs={"seed": name}, skip_if_exists=True)
    study.set_user_attr(READY_ATTR, True)


def wait_ready(study: optuna.Study, echo: Echo, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    said = False
    while not study.user_attrs.get(READY_ATTR):
        if time.monotonic() > deadline:
            raise SweepError(
                f"study {study.study_name!r} was never initialised (no baseline trial after "
                f"{timeout:.0f} s); delete it or use another study name"
            )
        if not said:
            echo("waiting for the worker that created the study to measure the baseline ...")
            said = True
        time.sleep(2)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)


def baseline_metrics(study: optuna.Study) -> dict:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number == 0:
            return dict(t.user_attrs.get("measured") or {})
    raise SweepError(f"study {study.study_name!r} has no completed baseline trial 0")


def requeue_interrupted(study: optuna.Study, worker: str | None = None) -> int:
    """Queue again, once each, the trials that Ctrl-C failed (only those ``worker`` ran, if
    given): the same parameters as a new WAITING trial, marked the way Optuna marks the retry
    of a stale trial. The interrupted worker does this itself; a run that starts does it for
    any left over (a worker stopped before it could)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    n = 0
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get("interrupted"):
            continue
        if worker is not None and t.user_attrs.get("worker") != worker:
            continue
        if t.number in retried:
            continue
        keep = {k: v for k, v in t.user_attrs.items() if k in ("seed",)}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs=keep,
                system_attrs={"failed_trial": t.number, "retry_history": [t.number]},
            )
        )
        n += 1
    return n


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


# ---------------------------------------------------------------------------------------------
# The worker loop


@dataclass
class WorkerArgs:
    recipe_path: str
    out_dir: str
    storage: str
    study: str
    index: int
    n_workers: int
    compute_threads: int | None
    latency_threads: int
    progress: bool
    verbose: bool
    keep_checkpoints: bool = False


def sampler_seed(recipe: Recipe, index: int, created: bool) -> int:
    """Worker 0 of the run that created the study uses the recipe's seed (reproducible);
    every other worker mixes in host and pid so that workers do not propose alike."""
    spec = recipe.sweep
    seed = recipe.seed if spec is None or spec.sampler.seed is None else spec.sampler.seed
    if index == 0 and created:
        return seed
    return int(stable_hash([seed, socket.gethostname(), os.getpid(), index], 8), 16)


def trial_line(trial: FrozenTrial, spec: SweepSpec, worker: str, done: int) -> str:
    """The terminal line for a finished trial; `done` is the study's completed trials."""
    a = trial.user_attrs
    head = f"[{done}/{spec.trials}] trial {trial.number} ({worker})"
    what = a.get("stages") or "baseline"
    if a.get("seed"):
        what = f"{a['seed']}: {what}"
    if trial.state == TrialState.PRUNED:
        return f"{head} skipped {what}: {a.get('error', 'pruned')}"
    if trial.state != TrialState.COMPLETE:
        return f"{head} FAILED {what}: {a.get('error', trial.state.name)}"
    parts = []
    for key, fmt in (
        ("perplexity", "ppl {:.2f}"),
        ("perplexity_ratio", "({:.4f}x)"),
        ("latency_ratio", "latency {:.3f}x"),
        ("weight_bytes_ratio", "weights {:.3f}x"),
    ):
        if isinstance(a.get(key), (int, float)):
            parts.append(fmt.format(a[key]))
    src = f", reused from {a['cached_from']}" if a.get("cached_from") else ""
    sec = a.get("seconds")
    took = f" [{sec:.1f} s{src}]" if isinstance(sec, (int, float)) else ""
    return f"{head} {what}: {' '.join(parts)}{took}"


def run_worker(
    recipe: Recipe,
    ws: Workspace,
    storage: RDBStorage,
    name: str,
    out_dir: Path,
    index: int,
    created: bool,
    latency_threads: int,
    echo: Echo,
    progress: bool,
    keep_checkpoints: bool = False,
) -> None:
    spec = recipe.sweep
    assert spec is not None
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    sampler = make_sampler(spec, sampler_seed(recipe, index, created))
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    w = Worker(
        recipe, spec, ws, out_dir, worker_id, latency_threads, keep_checkpoints, echo, progress
    )
    wait_ready(study, echo)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    w.base = baseline_metrics(study)
    if count(study, TrialState.COMPLETE) >= spec.trials:
        return
    max_failures = spec.max_failures or spec.trials

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)  # one read for the line and both limits
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        echo(trial_line(trial, spec, worker_id, done))
        if done >= spec.trials:
            study.stop()
        failed = sum(
            t.state in (TrialState.FAIL, TrialState.PRUNED) and not t.user_attrs.get("interrupted")
            for t in trials
        )
        if failed >= max_failures:
            echo(f"stopping: {failed} trials failed (sweep.max_failures {max_failures})")
            study.stop()

    timeout = spec.timeout_minutes * 60 if spec.timeout_minutes else None
    try:
        with gate.computing():  # sampling and bookkeeping count as computing too; see measure()
            study.optimize(
                lambda trial: run_trial(w, trial),
                n_trials=None,
                timeout=timeout,
                catch=(Exception,),
                callbacks=[after],
                gc_after_trial=True,
            )
    except KeyboardInterrupt:
        # Optuna has failed the running trial; queue it again at once, so that workers still
        # running elsewhere take it up (only this worker's own: Ctrl-C in a terminal reaches
        # every local worker, and each requeues what it was running)
        if n := requeue_interrupted(study, worker=worker_id):
            echo(f"queued {n} interrupted trial(s) again ({worker_id})")
        raise


def worker_main(args: WorkerArgs) -> int:
    """Entry of a local worker process (``--workers N``)."""
    from compress.recipe import load_recipe
    from compress.runtime import tune_allocator
    from compress.workbench import prepare

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"%(levelname)s worker{args.index} %(name)s: %(message)s",
    )
    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbose else optuna.logging.ERROR)
    tune_allocator()
    if args.compute_threads:
        torch.set_num_threads(args.compute_threads)
    gate.install(gate.MachineGate())
    recipe = load_recipe(args.recipe_path)
    assert recipe.sweep is not None
    try:
        ws = prepare(recipe, Path(args.recipe_path).resolve().parent, progress=False)
        storage = open_storage(args.storage, recipe.sweep)
        run_worker(
            recipe,
            ws,
            storage,
            args.study,
            Path(args.out_dir),
            args.index,
            False,
            args.latency_threads,
            lambda s: print(s, flush=True),
            args.progress,
            args.keep_checkpoints,
        )
    except KeyboardInterrupt:
        return 130
    except CompressError as exc:
        print(f"worker {args.index}: error: {exc}", flush=True)
        return 2
    except Exception as exc:  # the other workers go on; the run reports this one's exit code
        log.debug("worker %d failed", args.index, exc_info=True)
        print(f"worker {args.index}: failed: {type(exc).__name__}: {exc}", flush=True)
        return 1
    return 0


def spawn_workers(args: list[WorkerArgs], echo: Echo) -> list[int]:
    """Run local worker processes (``python -m compress.sweep.runner``) to the end; Ctrl-C
    reaches them through the terminal's process group, and is passed on if it did not."""
    import dataclasses
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "compress.sweep.runner", json.dumps(dataclasses.asdict(a))]
        )
        for a in args
    ]
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        echo("interrupted: waiting for workers to record their running trials as failed ...")
        deadline = time.monotonic() + 3
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise


if __name__ == "__main__":
    import sys

    sys.exit(worker_main(WorkerArgs(**json.loads(sys.argv[1]))))
