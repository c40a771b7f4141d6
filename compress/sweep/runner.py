"""Sweep workers: the loop that runs trials until the study has ``sweep.trials`` completed
ones, and the local worker processes of ``--workers N``.

    open the study (see :mod:`compress.sweep.study`)
    the first worker: baseline -> trial 0, seed variants queued as the next trials
    every worker: ask -> the objective (:mod:`compress.sweep.objective`) -> tell; until
                  `trials` complete
    the report reads every trial back from the study
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from compress import gate
from compress.cache import stable_hash
from compress.errors import CompressError
from compress.recipe import Recipe
from compress.storage import STORAGE_ENV, mask_url
from compress.sweep.claims import requeue_interrupted
from compress.sweep.objective import Worker, run_trial
from compress.sweep.progress import Echo, trial_line
from compress.sweep.study import (
    baseline_metrics,
    count,
    make_sampler,
    open_storage,
    wait_ready,
)
from compress.workbench import Workspace

log = logging.getLogger(__name__)


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


def worker_command(args: WorkerArgs) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a local worker. The storage URL, which may hold
    a password, travels in the environment (readable by this user only); the command line,
    which every user of the machine can list, holds it masked."""
    import dataclasses
    import sys

    shown = dataclasses.replace(args, storage=mask_url(args.storage))
    argv = [sys.executable, "-m", "compress.sweep.runner", json.dumps(dataclasses.asdict(shown))]
    return argv, {**os.environ, STORAGE_ENV: args.storage}


def worker_args(argv_json: str, environ: dict[str, str]) -> WorkerArgs:
    """The inverse of :func:`worker_command`: the worker's arguments, storage URL included."""
    args = WorkerArgs(**json.loads(argv_json))
    full = environ.get(STORAGE_ENV)
    if full is not None and mask_url(full) == args.storage:
        args.storage = full
    return args


def spawn_workers(args: list[WorkerArgs], echo: Echo) -> list[int]:
    """Run local worker processes (``python -m compress.sweep.runner``) to the end; Ctrl-C
    reaches them through the terminal's process group, and is passed on if it did not."""
    import subprocess

    procs = []
    for a in args:
        argv, env = worker_command(a)
        procs.append(subprocess.Popen(argv, env=env))
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

    sys.exit(worker_main(worker_args(sys.argv[1], dict(os.environ))))
