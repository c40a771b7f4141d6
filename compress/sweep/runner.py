"""Sweep workers: the loop that runs trials until the study has ``sweep.trials`` completed
ones, and the local worker processes of ``--workers N``.

    open the study (see :mod:`compress.sweep.study`)
    the first worker: baseline -> trial 0, seed variants queued as the next trials
    every worker: claim a trial (:mod:`compress.sweep.claims`) -> the objective
                  (:mod:`compress.sweep.objective`), heartbeating -> tell; until `trials`
                  complete, waiting while every trial of the budget is claimed
    the report reads every trial back from the study

A worker whose trial another worker failed meanwhile (its heartbeat went stale) says so in
one line and goes on. The parent of local workers passes their stderr through, keeps each
one's last line, and reports a worker that dies with it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from compress import gate
from compress.cache import stable_hash
from compress.errors import CompressError
from compress.recipe import Recipe
from compress.storage import STORAGE_ENV, mask_url
from compress.sweep.claims import (
    Claim,
    Heartbeat,
    LabelError,
    Released,
    claim,
    claim_lock,
    release_dead,
    requeue_interrupted,
)
from compress.sweep.objective import Variant, Worker, label, result_path, run_trial
from compress.sweep.progress import Echo, trial_line
from compress.sweep.space import SweepSpec
from compress.sweep.study import (
    baseline_metrics,
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
    """Claim and run trials until the study has ``sweep.trials`` completed ones (or the
    failure limit or the timeout stops it). When every trial of the budget is claimed but not
    all are complete, wait: a trial whose worker dies is queued again, and taken up here."""
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
    deadline = time.monotonic() + spec.timeout_minutes * 60 if spec.timeout_minutes else math.inf
    poll = poll_seconds(storage)
    variants: dict[int, Variant] = {}

    def labelled(trial: optuna.Trial) -> str:
        variants[trial.number] = label(w, trial)
        return variants[trial.number].key

    def said(released: Released) -> None:
        echo(released.line())

    waiting = False
    try:
        while not _should_stop(study, spec, echo) and time.monotonic() < deadline:
            try:
                with gate.computing():  # sampling counts as computing too; see measure()
                    c = claim(study, storage, spec.trials, worker_id, labelled, said)
            except LabelError as exc:  # the trial is failed with the error; the sweep goes on
                log.debug("claiming a trial failed", exc_info=True)
                echo(f"{worker_id}: {exc}")
                continue
            if c is None:
                if not waiting:
                    echo(f"{worker_id}: every trial is claimed; waiting for the running ones")
                waiting = True
                time.sleep(poll)
                continue
            waiting = False
            run_claimed(w, study, storage, c, variants.pop(c.trial.number), poll)
    except KeyboardInterrupt:
        # the running trial is failed as interrupted; queue it again at once, so that workers
        # still running elsewhere take it up (only this worker's own: Ctrl-C in a terminal
        # reaches every local worker, and each requeues what it was running)
        if n := requeue_interrupted(study, worker=worker_id):
            echo(f"queued {n} interrupted trial(s) again ({worker_id})")
        raise


def poll_seconds(storage: RDBStorage) -> float:
    """How often a waiting worker looks at the study again: often enough to take up a dead
    worker's trial soon after its heartbeat goes stale."""
    return min(2.0, (storage.get_heartbeat_interval() or 4) / 2)


def _should_stop(study: optuna.Study, spec: SweepSpec, echo: Echo) -> bool:
    trials = study.get_trials(deepcopy=False)
    if sum(t.state == TrialState.COMPLETE for t in trials) >= spec.trials:
        return True
    max_failures = spec.max_failures or spec.trials
    # trials that failed for a reason of their own; a dead worker's trial is queued again
    failed = sum(
        t.state in (TrialState.FAIL, TrialState.PRUNED)
        and bool(t.user_attrs.get("error"))
        and not t.user_attrs.get("interrupted")
        for t in trials
    )
    if failed >= max_failures:
        echo(f"stopping: {failed} trials failed (sweep.max_failures {max_failures})")
        return True
    return False


def run_claimed(
    w: Worker, study: optuna.Study, rdb: RDBStorage, c: Claim, variant: Variant, poll: float
) -> None:
    """Run a claimed trial with its heartbeat going, tell the study and print its line. If
    another worker failed the trial meanwhile (a stale heartbeat: this process was stopped or
    starved), say so in one line and go on; the result stays in the result cache."""
    trial, storage = c.trial, study._storage
    state, values = TrialState.FAIL, None
    with Heartbeat(rdb, trial._trial_id):
        try:
            if c.twin is not None:
                wait_for_twin(study, rdb, c, poll, w.echo)
            with gate.computing():
                values = run_trial(w, trial, variant)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except UpdateFinishedTrialError:
            _lost(w, trial, variant)
            return
        except KeyboardInterrupt:
            with contextlib.suppress(UpdateFinishedTrialError):
                trial.set_user_attr("error", "interrupted")
                trial.set_user_attr("interrupted", True)
            _tell(study, trial, TrialState.FAIL, None)
            raise
        except Exception:  # run_trial recorded the error on the trial
            log.debug("trial %d failed", trial.number, exc_info=True)
    if not _tell(study, trial, state, values):
        _lost(w, trial, variant)
        return
    gc.collect()
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    w.echo(trial_line(storage.get_trial(trial._trial_id), w.spec, w.worker_id, done))


def _tell(
    study: optuna.Study, trial: optuna.Trial, state: TrialState, values: list[float] | None
) -> bool:
    """Tell the study how the trial ended; False if another worker had failed it already."""
    try:
        study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    except (UpdateFinishedTrialError, ValueError):
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            raise
        return False
    return True


def _lost(w: Worker, trial: optuna.Trial, variant: Variant) -> None:
    kept = (
        "its result is in the result cache for the retry"
        if result_path(variant.key).is_file()
        else "moving on"
    )
    w.echo(
        f"trial {trial.number} ({w.worker_id}): another worker failed it while it ran here "
        f"(no heartbeat within the grace period); {kept}"
    )


def wait_for_twin(study: optuna.Study, rdb: RDBStorage, c: Claim, poll: float, echo: Echo) -> None:
    """Wait until the earlier trial of the same configuration is no longer running (its
    result is then reused), taking care that a dead worker's twin does not hold us forever."""
    assert c.twin is not None
    twin_id, number = c.twin
    echo(
        f"trial {c.trial.number}: the same configuration is running as trial {number}; "
        "waiting for its result"
    )
    storage = study._storage
    while storage.get_trial(twin_id).state == TrialState.RUNNING:
        time.sleep(poll)
        with claim_lock(rdb, study._study_id):
            for released in release_dead(study, rdb):
                echo(released.line())


def worker_main(args: WorkerArgs) -> int:
    """Entry of a local worker process (``--workers N``). Trial lines go to stdout; an error
    that ends the worker is its last line on stderr, which the parent reports."""
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
    try:
        recipe = load_recipe(args.recipe_path)
        if recipe.sweep is None:
            raise CompressError(f"{args.recipe_path}: the recipe has no sweep: section")
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
        print(f"worker {args.index}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # the other workers go on; the run reports this one's exit code
        log.debug("worker %d failed", args.index, exc_info=True)
        print(f"worker {args.index}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.stderr.flush()
        return 1
    return 0


def worker_command(args: WorkerArgs) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a local worker. The storage URL, which may hold
    a password, travels in the environment (readable by this user only); the command line,
    which every user of the machine can list, holds it masked."""
    import dataclasses

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


@dataclass
class WorkerExit:
    """How a local worker process ended, with the last line it wrote to stderr."""

    index: int
    pid: int
    code: int
    last_error: str | None = None

    @property
    def failed(self) -> bool:
        return self.code not in (0, 130)

    def describe(self) -> str:
        if self.code < 0:
            try:
                how = f"was killed by {signal.Signals(-self.code).name}"
            except ValueError:
                how = f"was killed by signal {-self.code}"
        else:
            how = f"exited with code {self.code}"
        said = f"; its last error output: {self.last_error}" if self.last_error else ""
        return f"worker {self.index} (pid {self.pid}) {how}{said or '; it wrote no error output'}"


class _StderrTail:
    """Pass a child's stderr through to ours, keeping its last lines."""

    def __init__(self, stream: IO[str] | None, keep: int = 20) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                self.lines.append(line.strip())

    def last(self, timeout: float = 10) -> str | None:
        self._thread.join(timeout)  # the rest of the output, up to the end of the stream
        return self.lines[-1] if self.lines else None


def spawn_workers(
    args: list[WorkerArgs], echo: Echo, on_exit: Callable[[WorkerExit], Any] = lambda e: None
) -> list[WorkerExit]:
    """Run local worker processes (``python -m compress.sweep.runner``) to the end, calling
    `on_exit` as each one ends (the driver then queues a dead worker's trial again at once);
    Ctrl-C reaches them through the terminal's process group, and is passed on if it did not.
    """
    import subprocess

    procs = []
    for a in args:
        argv, env = worker_command(a)
        procs.append(
            subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        )
    tails = [_StderrTail(p.stderr) for p in procs]
    exits: dict[int, WorkerExit] = {}
    try:
        while len(exits) < len(procs):
            for i, p in enumerate(procs):
                if i in exits or p.poll() is None:
                    continue
                exits[i] = WorkerExit(args[i].index, p.pid, p.returncode, tails[i].last())
                on_exit(exits[i])
            time.sleep(0.2)
        return [exits[i] for i in range(len(procs))]
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
    sys.exit(worker_main(worker_args(sys.argv[1], dict(os.environ))))
