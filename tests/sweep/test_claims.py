"""Claiming trials (compress.sweep.claims) without building models: concurrent claimers stop
at the budget and never measure one configuration twice at once; a dead worker's trial is
failed and queued again, at once for a process of this machine, after the grace otherwise;
a local worker's exit is reported with its last error line."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from compress.sweep.claims import (
    KEY_ATTR,
    OWNER_ATTR,
    PROCESS_ATTR,
    REASON_ATTR,
    claim,
    process_token,
    release_dead,
)
from compress.sweep.space import SweepSpec
from compress.sweep.study import open_storage

SPEC = SweepSpec(
    params={"x": {"choice": [0, 1, 2]}},
    pipeline=[{"prune": {"sparsity": "$x"}}],
    heartbeat={"interval": 1, "grace": 30},
)
BUDGET = 12
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # our own ask()s
CLAIMERS = 4


def _label(trial: optuna.Trial) -> str:
    key = f"x={trial.suggest_categorical('x', [0, 1, 2])}"
    trial.set_user_attr(KEY_ATTR, key)
    return key


def _claimer(url: str, name: str, index: int, out: str) -> None:
    """One worker, as the sweep runs it: claim; wait for a running twin; measure (a short
    sleep) unless a finished trial of the configuration exists; tell. It logs each
    measurement's (key, start, end) on the machine's monotonic clock."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rdb = open_storage(url, SPEC)
    sampler = optuna.samplers.RandomSampler(seed=index)
    study = optuna.load_study(study_name=name, storage=rdb, sampler=sampler)
    measured, waited = [], 0
    while len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < BUDGET:
        c = claim(study, rdb, BUDGET, f"claimer-{index}", _label)
        if c is None:
            time.sleep(0.05)
            continue
        if c.twin is not None:
            waited += 1
            while rdb.get_trial(c.twin[0]).state == TrialState.RUNNING:
                time.sleep(0.01)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not any(t.user_attrs.get(KEY_ATTR) == c.key for t in done):
            start = time.monotonic()
            time.sleep(0.05)
            measured.append((c.key, start, time.monotonic()))
        study.tell(c.trial, [1.0])
    Path(out).write_text(json.dumps({"measured": measured, "waited": waited}))


def _claim_concurrently(url: str, tmp_path: Path) -> None:
    name = f"claims-{tmp_path.name}"
    optuna.create_study(study_name=name, storage=open_storage(url, SPEC))
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"claimer-{i}.json" for i in range(CLAIMERS)]
    procs = [
        ctx.Process(target=_claimer, args=(url, name, i, str(out))) for i, out in enumerate(outs)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials()
    # exactly the budget: no claimer created a trial once the budget was claimed
    assert [t.state for t in trials] == [TrialState.COMPLETE] * BUDGET
    logs = [json.loads(out.read_text()) for out in outs]
    spans = sorted(s for log in logs for s in log["measured"])
    assert {key for key, _, _ in spans} <= {"x=0", "x=1", "x=2"}
    for (key, _, end), (later, start, _) in zip(spans, spans[1:]):
        if key == later:
            assert end <= start, f"{key} was measured twice at once"
    # each configuration was measured once: the rest waited for it or reused its result
    assert len(spans) == len({key for key, _, _ in spans})


def test_sqlite_claimers_stop_at_the_budget_and_measure_each_config_once(
    tmp_path: Path,
) -> None:
    _claim_concurrently(f"sqlite:///{tmp_path / 'claims.db'}", tmp_path)


def test_postgres_claimers_stop_at_the_budget_and_measure_each_config_once(
    postgres_url: str, tmp_path: Path
) -> None:
    _claim_concurrently(postgres_url, tmp_path)


def _running(study: optuna.Study, rdb, token: str, seed: str | None = None) -> optuna.Trial:
    """A trial claimed by the process that `token` names, with a fresh heartbeat."""
    trial = study.ask()
    rdb.record_heartbeat(trial._trial_id)
    trial.suggest_categorical("x", [0, 1, 2])
    trial.set_user_attr(OWNER_ATTR, f"host:{token.rsplit('|', 2)[1]}")
    trial.set_user_attr(PROCESS_ATTR, token)
    if seed:
        trial.set_user_attr("seed", seed)
    return trial


def test_a_dead_workers_trial_is_queued_again_at_once_a_silent_ones_after_the_grace(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    rdb = open_storage(url, SPEC)  # grace 30 s: nothing goes stale in the first part
    study = optuna.create_study(study_name="dead", storage=rdb)
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    token = process_token(gone.pid)
    gone.kill()
    gone.wait()
    study.enqueue_trial({"x": 2})
    dead = _running(study, rdb, token, seed="s2")
    live = _running(study, rdb, process_token())

    # the dead process's trial at once (no heartbeat has gone stale yet), not the live one's
    (released,) = release_dead(study, rdb)
    assert released.number == dead.number and released.requeued
    assert released.reason == f"worker host:{gone.pid} exited"
    trials = {t.number: t for t in study.get_trials()}
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[live.number].state == TrialState.RUNNING
    (retry,) = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert retry.params == {"x": 2} and retry.user_attrs == {"seed": "s2"}
    assert retry.system_attrs["failed_trial"] == dead.number
    assert retry.system_attrs[REASON_ATTR] == released.reason

    # a live process that stops heartbeating: once its heartbeat is older than the grace
    short = open_storage(
        url,
        SweepSpec(
            params=SPEC.params, pipeline=SPEC.pipeline, heartbeat={"interval": 1, "grace": 2}
        ),
    )
    deadline = time.monotonic() + 60
    again = []
    while not again and time.monotonic() < deadline:
        time.sleep(0.5)
        again = release_dead(study, short)
    assert [r.number for r in again] == [live.number]
    owner = live.user_attrs[OWNER_ATTR]
    assert again[0].reason == f"worker {owner} sent no heartbeat for 2 s"
    assert release_dead(study, short) == []  # each is queued again once
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [dead.number, live.number]


def test_a_local_worker_that_fails_is_reported_with_its_last_error_line(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from compress.sweep import runner  # not at the top: spawned claimers need no torch

    missing = tmp_path / "missing.yaml"
    args = runner.WorkerArgs(
        str(missing), str(tmp_path), f"sqlite:///{tmp_path / 'w.db'}", "w", 3, 1, 1, 1, False, False
    )
    seen: list = []
    (ended,) = runner.spawn_workers([args], print, seen.append)
    assert seen == [ended] and ended.failed and ended.index == 3 and ended.code == 2
    assert ended.last_error is not None and ended.last_error.startswith("worker 3: error: ")
    assert str(missing) in ended.last_error and "file not found" in ended.last_error
    assert ended.describe() == (
        f"worker 3 (pid {ended.pid}) exited with code 2; its last error output: {ended.last_error}"
    )
    assert ended.last_error in capfd.readouterr().err  # passed through as it was written
    killed = runner.WorkerExit(1, 4242, -9)
    assert (
        killed.describe() == "worker 1 (pid 4242) was killed by SIGKILL; it wrote no error output"
    )
