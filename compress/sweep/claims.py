"""Which worker runs which trial, and what happens to the trial of a worker that died.

A worker claims a trial under the study's claim lock (:func:`claim_lock`: a file lock beside
an SQLite database, a PostgreSQL advisory lock), so that nothing changes between reading the
study and taking a trial:

    fail the trials of dead workers, queue each again -> count the trials claimed (complete
    or running) against the budget -> ask (a queued trial first) -> record the heartbeat, the
    owner and the trial's configuration -> note an earlier running trial of the same
    configuration, which the claimer waits for and then reuses

A trial's owner is dead when its heartbeat is older than the grace period, or at once when it
ran on this machine and its process is gone. Its trial is failed and queued again with the
same parameters (at most ``MAX_RETRIES`` times: a configuration that kills its worker, by
running out of memory say, does not loop). Ctrl-C fails the running trial with reason
"interrupted", and the worker queues it again before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

OWNER_ATTR = "worker"  # host:pid of the worker that runs the trial, as reports show it
PROCESS_ATTR = "worker_process"  # machine identity, pid and start time: tells a dead owner
KEY_ATTR = "config_key"  # what decides the trial's numbers (the objective sets it)
REASON_ATTR = "failed_because"  # on a retry: why the trial it repeats was failed
MAX_RETRIES = 2
PG_LOCK_CLASS = 0x636D7072  # first key of the PostgreSQL advisory lock ("cmpr")

_local_locks: dict[str, threading.Lock] = {}


# ---------------------------------------------------------------------------------------------
# Who owns a trial, and whether it is still alive


@cache
def machine_identity() -> str:
    """This machine and process namespace: host name, boot id and pid namespace, so that a pid
    is only compared with pids of the same kernel and namespace."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); None
    if no such process or a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def process_token(pid: int | None = None) -> str:
    """``identity|pid|start time`` of a process of this machine (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{machine_identity()}|{pid}|{_start_time(pid) or ''}"


def owner_alive(token: object) -> bool | None:
    """Whether the process a :func:`process_token` names still runs: True or False when it is
    a process of this machine, None when that cannot be told here (another machine's)."""
    if not isinstance(token, str) or token.count("|") < 2:
        return None
    machine, pid_text, started = token.rsplit("|", 2)
    if machine != machine_identity() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if Path("/proc/self/stat").is_file():
        now = _start_time(pid)
        return now is not None and (not started or now == started)  # a reused pid: dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# The claim lock


@contextlib.contextmanager
def claim_lock(storage: RDBStorage, study_id: int) -> Iterator[None]:
    """Hold the study's claim lock: one claimer at a time, across processes and machines.

    SQLite: ``flock`` on ``<database>.claims.lock`` (the kernel drops it when its holder
    dies). PostgreSQL: a transaction-scoped advisory lock on its own connection (dropped when
    the transaction or the connection ends). Other databases: not serialized (a warning);
    claims are then as good as the database's own row locks.
    """
    url = storage.engine.url
    if url.get_backend_name() == "sqlite":
        with _sqlite_lock(url.database):
            yield
    elif url.get_backend_name() == "postgresql":
        import sqlalchemy as sa

        with storage.engine.connect() as conn:
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": PG_LOCK_CLASS, "b": study_id}
            )
            try:
                yield
            finally:
                conn.rollback()  # ends the transaction and with it the lock
    else:
        _warn_unserialized(url.get_backend_name())
        yield


@contextlib.contextmanager
def _sqlite_lock(database: str | None) -> Iterator[None]:
    if not database or database == ":memory:":  # one process: a thread lock is enough
        with _local_locks.setdefault(":memory:", threading.Lock()):
            yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: SQLite's own locking only
        _warn_unserialized("sqlite without fcntl")
        yield
        return
    path = Path(database).with_name(Path(database).name + ".claims.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


@cache
def _warn_unserialized(backend: str) -> None:
    log.warning("claims are not serialized on %s: concurrent workers may overshoot", backend)


# ---------------------------------------------------------------------------------------------
# Heartbeats


class Heartbeat:
    """Record a trial's heartbeat now and then every ``interval`` seconds from a thread, until
    the block ends. A failed write is logged and retried at the next beat."""

    def __init__(self, storage: RDBStorage, trial_id: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self.interval = storage.get_heartbeat_interval() or 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # the database may be busy; the grace period allows it
                log.warning("trial id %d: heartbeat not recorded: %s", self.trial_id, exc)


# ---------------------------------------------------------------------------------------------
# Dead workers' trials


@dataclass
class Released:
    """A running trial whose worker was found dead, failed and (unless retried too often)
    queued again."""

    number: int
    reason: str
    requeued: bool

    def line(self) -> str:
        again = "queued again" if self.requeued else f"not queued again ({MAX_RETRIES} retries)"
        return f"trial {self.number}: {self.reason}; failed and {again}"


def _grace(storage: RDBStorage) -> float:
    interval = storage.get_heartbeat_interval()
    return float(storage.grace_period or 2 * (interval or 0))


def dead_reason(trial: FrozenTrial, stale: set[int], grace: float) -> str | None:
    """Why `trial` (RUNNING) has no live worker, or None if it may have one."""
    who = trial.user_attrs.get(OWNER_ATTR)
    if owner_alive(trial.user_attrs.get(PROCESS_ATTR)) is False:
        return f"worker {who} exited"
    if trial._trial_id in stale:
        return f"worker {who} sent no heartbeat for {grace:g} s"
    started = trial.datetime_start
    if who is None and started is not None and datetime.now() - started > timedelta(seconds=grace):
        return "a worker claimed it and died before it recorded itself"
    return None


def release_dead(study: optuna.Study, rdb: RDBStorage) -> list[Released]:
    """Fail the RUNNING trials whose worker is dead and queue each again with the same
    parameters. Call it under :func:`claim_lock`, which makes the queueing happen once.
    `rdb` is the database under the study's storage (``study._storage`` may wrap it)."""
    storage = study._storage
    stale: set[int] = set()
    if rdb.get_heartbeat_interval():
        stale = set(rdb._get_stale_trial_ids(study._study_id))
    grace = _grace(rdb)
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    out = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        reason = dead_reason(t, stale, grace)
        if reason is None:
            continue
        try:
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # its worker finished it after all
            continue
        history = list(t.system_attrs.get("retry_history", []))
        requeued = t.number not in retried and len(history) < MAX_RETRIES
        if requeued:
            requeue(study, t, reason)
        out.append(Released(t.number, reason, requeued))
        log.info("trial %d: %s", t.number, reason)
    return out


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Queue `trial` again: a WAITING trial with its parameters and seed, marked the way
    Optuna marks the retry of a failed trial, with why it was failed."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    keep = {k: v for k, v in trial.user_attrs.items() if k in ("seed",)}
    marks = {"failed_trial": trial.number, "retry_history": history, REASON_ATTR: reason}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=keep,
            system_attrs=marks,
        )
    )


def requeue_interrupted(study: optuna.Study, worker: str | None = None) -> int:
    """Queue again, once each, the trials that Ctrl-C failed (only those ``worker`` ran, if
    given). The interrupted worker does this itself; a run that starts does it for any left
    over (a worker stopped before it could)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    n = 0
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get("interrupted"):
            continue
        if worker is not None and t.user_attrs.get(OWNER_ATTR) != worker:
            continue
        if t.number in retried:
            continue
        requeue(study, t, "interrupted")
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Claiming


class LabelError(Exception):
    """A claimed trial's `label` raised; the trial is failed with the error."""


@dataclass
class Claim:
    """A trial this worker now runs; `twin` is a trial of the same configuration that was
    running when this one was claimed (its trial id and number): wait for it, then reuse."""

    trial: optuna.Trial
    key: str
    twin: tuple[int, int] | None


def claimed(trials: list[FrozenTrial]) -> int:
    """Trials that count against the budget: finished with a result, or running."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in trials)


def claim(
    study: optuna.Study,
    rdb: RDBStorage,
    budget: int,
    owner: str,
    label: Callable[[optuna.Trial], str],
    on_release: Callable[[Released], Any] = lambda r: None,
) -> Claim | None:
    """Take the next trial (a queued one first, else the sampler's), unless `budget` trials
    are claimed already (then None). `label(trial)` suggests its parameters, records its
    configuration and returns its key (:data:`KEY_ATTR`). If `label` raises, the trial is
    failed and :class:`LabelError` raised (Ctrl-C: the trial is marked interrupted, for
    :func:`requeue_interrupted`, and KeyboardInterrupt raised).
    """
    storage = study._storage
    with claim_lock(rdb, study._study_id):
        for released in release_dead(study, rdb):
            on_release(released)
        trials = study.get_trials(deepcopy=False)
        if claimed(trials) >= budget:
            return None
        with warnings.catch_warnings():  # the heartbeat is ours (see Heartbeat), not optimize's
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(OWNER_ATTR, owner)
        trial.set_user_attr(PROCESS_ATTR, process_token())
        try:
            key = label(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
            raise LabelError(f"trial {trial.number} failed before it started: {error}") from exc
        # every running trial was claimed before this one (claims are serialized), so waits
        # point back in time and never form a cycle, whatever the trial numbers
        twins = [
            t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(KEY_ATTR) == key
        ]
        twin = min(twins, key=lambda t: t.number) if twins else None
        return Claim(trial, key, (twin._trial_id, twin.number) if twin else None)
