"""The sweep's storage: on SQLite, concurrent workers open a fresh database together and claim
each queued trial exactly once."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from compress.sweep.space import SweepSpec
from compress.sweep.study import open_storage

SPEC = SweepSpec(params={"x": {"int": [0, 1000]}}, pipeline=[{"prune": {"sparsity": "$x"}}])
QUEUED = 120
WORKERS = 4


def _claim_all(url: str, start: float, out: mp.Queue) -> None:
    """One worker: claim queued trials the way Study.optimize does, until none is left."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="q", storage=open_storage(url, SPEC))
    while time.time() < start:  # every worker starts claiming at the same moment
        time.sleep(0.001)
    claimed = []
    while (trial_id := study._pop_waiting_trial_id()) is not None:
        claimed.append(trial_id)
    out.put(claimed)


def test_sqlite_workers_claim_each_queued_trial_once(tmp_path: Path) -> None:
    # Optuna claims a queued trial by SELECT ... FOR UPDATE, which SQLite ignores; without
    # open_storage's BEGIN IMMEDIATE, 4 workers claimed 26 of these 120 trials twice.
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = optuna.create_study(study_name="q", storage=open_storage(url, SPEC))
    for i in range(QUEUED):
        study.enqueue_trial({"x": i})
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 3  # after every spawned worker has imported and opened the study
    procs = [ctx.Process(target=_claim_all, args=(url, start, out)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    claims = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    ids = [i for c in claims for i in c]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} trials were claimed twice"
    assert len(ids) == QUEUED
    assert sum(1 for c in claims if c) >= 2, "the claims did not overlap in time"
    states = {t.state for t in study.get_trials()}
    assert states == {TrialState.RUNNING}


def _open_at(url: str, start: float, out: mp.Queue) -> None:
    """One command starting on a fresh database: open it at ``start``."""
    while time.time() < start:
        time.sleep(0.001)
    try:
        open_storage(url, SPEC)
        out.put("ok")
    except Exception as exc:  # the test shows what went wrong
        out.put(f"{type(exc).__name__}: {exc}")


def test_commands_opening_a_fresh_sqlite_database_together_all_open_it(tmp_path: Path) -> None:
    # Optuna creates its tables when the database has none; without open_storage's lock, 4
    # processes opening a fresh database at one moment failed 11 times in 24 ("table studies
    # already exists"), as two sweep commands started together on one study did
    ctx = mp.get_context("spawn")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'fresh-{round_}.db'}"
        out = ctx.Queue()
        start = time.time() + 4  # after every spawned process has imported compress
        procs = [ctx.Process(target=_open_at, args=(url, start, out)) for _ in range(WORKERS)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == ["ok"] * WORKERS, results
    # the lock is in the machine's lock folder: nothing beside the user's database
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"fresh-{i}.db" for i in range(3)]


def test_the_report_folder_records_the_storage_without_its_password(tmp_path: Path) -> None:
    from compress.dashboard import resolve
    from compress.sweep.driver import write_pointer

    path = write_pointer(tmp_path, "postgresql+psycopg://me:s3cret@db.example:5432/optuna", "s")
    text = path.read_text()
    assert "s3cret" not in text and "me:***@db.example" in text
    (tmp_path / "artifacts").mkdir()
    # the dashboard drops the masked password (libpq then reads PGPASSWORD or ~/.pgpass)
    assert resolve(tmp_path)[0] == "postgresql+psycopg://me@db.example:5432/optuna"
