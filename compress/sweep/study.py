"""The sweep's study: where it is stored, how it is opened or joined, and its sampler.

A study is SQLite in the report folder by default, or any SQLAlchemy URL such as PostgreSQL.
The first worker creates it and records what it was created for (recipe, baseline, search
space, objectives); a worker of another recipe is refused. On SQLite every transaction begins
IMMEDIATE, so two workers never claim the same queued trial (see open_storage).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from compress.cache import stable_hash
from compress.errors import CompressError
from compress.locks import default_lock_dir, exclusive, shared_dir
from compress.storage import mask_url
from compress.sweep.progress import Echo
from compress.sweep.space import ParamSpec, SweepSpec

STUDY_ATTR = "compress"  # study user attr: recipe, baseline key, space hash, objectives
READY_ATTR = "compress_ready"  # set once trial 0 and the seeds are in
INIT_ATTR = "compress_init_started"

if TYPE_CHECKING:  # importing them loads torch, which opening a study does not need
    from compress.recipe import Recipe
    from compress.workbench import Workspace


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
    # Optuna creates its tables when a database has none: two processes opening a fresh one at
    # once both try (SQLite: "table studies already exists"). On SQLite they take turns through
    # a lock in the machine's lock folder (nothing is written beside the user's database, whose
    # folder may be a report folder the run is about to refuse); elsewhere the loser retries.
    creating: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if sqlite:
        # isolation_level None: the sqlite3 driver leaves BEGIN to us (see _serialize_sqlite)
        engine_kwargs["connect_args"] = {"timeout": 120, "isolation_level": None}
        database = Path(url.split("///", 1)[-1])
        database.parent.mkdir(parents=True, exist_ok=True)
        if str(database) not in ("", ":memory:"):
            name = hashlib.sha256(os.path.realpath(database).encode()).hexdigest()[:16]
            lock = shared_dir(default_lock_dir()) / f"sqlite-open-{name}.lock"
            creating = lambda: exclusive(lock)  # noqa: E731
    else:
        engine_kwargs["pool_pre_ping"] = True
    from sqlalchemy.exc import IntegrityError

    for attempt in range(5):
        try:
            with warnings.catch_warnings(), creating():
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
        except ModuleNotFoundError as exc:
            hint = " (pip install 'compress[postgres]')" if "psycopg" in str(exc) else ""
            raise SweepError(f"storage {mask_url(url)}: missing driver: {exc}{hint}") from None
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if not (isinstance(exc, IntegrityError) or "already exists" in str(exc)):
                raise SweepError(f"storage {mask_url(url)}: cannot open: {reason}") from None
            # another process is creating the tables of a fresh database at the same moment
            if attempt == 4:
                raise SweepError(
                    f"storage {mask_url(url)}: cannot create Optuna's tables: {reason}"
                ) from None
            time.sleep(1 + attempt)
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


def space_hash(spec: SweepSpec) -> str:
    return stable_hash(
        {
            "params": {k: v.model_dump(mode="json") for k, v in spec.params.items()},
            "pipeline": spec.pipeline,
            "objectives": spec.objectives,
        }
    )


def _compress_attrs(recipe: Recipe, ws: Workspace, spec: SweepSpec) -> dict:
    return {
        "recipe": recipe.name,
        "baseline_key": ws.baseline_info.identity,  # a partial baseline is another baseline
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


def recorded(trial: FrozenTrial, key: str) -> Any:
    """What the sweep recorded on a trial for itself (``measured``, ``pipeline``): a system
    attribute, or a user attribute in a study written before they moved there."""
    if key in trial.system_attrs:
        return trial.system_attrs[key]
    return trial.user_attrs.get(key)


def baseline_metrics(study: optuna.Study) -> dict:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number == 0:
            return dict(recorded(t, "measured") or {})
    raise SweepError(f"study {study.study_name!r} has no completed baseline trial 0")


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))
