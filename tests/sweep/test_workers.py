"""Several workers on one study: local processes (`--workers N`) and separate commands sharing
a storage URL, as other machines would. No trial is lost, run twice, or left running.

The PostgreSQL test needs a server: set COMPRESS_TEST_POSTGRES_URL, e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test (`.ci/run` does).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.sweep.conftest import (
    running_trial,
    slow_sweep_recipe,
    start_sweep,
    sweep_recipe,
    sweep_study,
    write_recipe,
)

LINE = re.compile(r"^\[\d+/\d+\] trial (\d+) \(([^)]+)\)", re.M)


def _check_study(study: optuna.Study, outputs: list[str], budget: int, workers: int) -> None:
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    assert states[TrialState.FAIL] == 0, [t.user_attrs.get("error") for t in trials]
    # the budget counts claimed trials, so concurrent workers never overshoot it
    assert states[TrialState.COMPLETE] == budget, states
    # the baseline is trial 0 and each seed ran exactly once
    assert trials[0].user_attrs["seed"] == "baseline"
    seeds = Counter(t.user_attrs.get("seed") for t in trials if t.user_attrs.get("seed"))
    assert seeds == {"baseline": 1, "int8": 1, "prune50": 1}
    # no configuration was measured twice: a repeat waited for the first or reused it
    measured = [t.user_attrs["config_key"] for t in trials if not t.user_attrs.get("cached_from")]
    assert len(measured) == len(set(measured)), "a configuration was measured twice"
    # each trial was run by exactly one worker: the one its record names
    ran = [(int(n), w) for text in outputs for n, w in LINE.findall(text)]
    numbers = [n for n, _ in ran]
    assert sorted(numbers) == sorted(set(numbers)), "a trial was run twice"
    assert set(numbers) == {t.number for t in trials if t.number != 0}, "a trial was lost"
    by_number = {t.number: t for t in trials}
    for n, worker in ran:
        assert by_number[n].user_attrs["worker"].endswith(worker.removeprefix(".."))
    assert len({w for _, w in ran}) >= 2, "the work was not shared"


def test_local_workers_share_one_sqlite_study(tmp_path: Path, tiny_workspace) -> None:
    recipe = write_recipe(tmp_path / "w.yaml", sweep_recipe(trials=10))
    out = tmp_path / "report"
    proc = start_sweep(recipe, out, "--workers", "2")
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert "starting 2 workers" in text
    _check_study(sweep_study(out), [text], budget=10, workers=2)


def test_machines_join_one_postgres_study(
    postgres_url: str, tmp_path: Path, tiny_workspace
) -> None:
    """Two commands with the same storage URL and study name, as two machines would run
    them, each with two local workers: four concurrent workers on one PostgreSQL study."""
    name = f"tiny-sweep-{uuid.uuid4().hex[:8]}"
    recipe = write_recipe(tmp_path / "pg.yaml", sweep_recipe(trials=14))
    args = ("--storage", postgres_url, "--study", name, "--workers", "2")
    first = start_sweep(recipe, tmp_path / "a", *args)
    second = start_sweep(recipe, tmp_path / "b", *args)
    try:
        texts = [p.communicate(timeout=600)[0] for p in (first, second)]
        assert first.returncode == 0, texts[0]
        assert second.returncode == 0, texts[1]
        study = optuna.load_study(study_name=name, storage=postgres_url)
        _check_study(study, texts, budget=14, workers=4)
        # only one of the two created the study and measured the baseline
        assert sum("trial 0: measuring the baseline" in t for t in texts) == 1
        # both wrote a report of the whole study, and the dashboard finds it from the folder
        from compress.dashboard import open_storage, resolve_source

        for sub in ("a", "b"):
            assert (tmp_path / sub / "report.html").is_file()
            _, names = open_storage(resolve_source(tmp_path / sub))
            assert name in names
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
        try:
            optuna.delete_study(study_name=name, storage=postgres_url)
        except KeyError:
            pass


@pytest.mark.slow
def test_two_commands_on_one_sqlite_study_share_the_budget(tmp_path: Path, tiny_workspace) -> None:
    """Two commands, each with two local workers, on one SQLite study (as two terminals on one
    machine): exactly `trials` complete, no configuration measured twice."""
    recipe = write_recipe(tmp_path / "two.yaml", sweep_recipe(trials=10))
    args = ("--storage", f"sqlite:///{tmp_path / 'shared.db'}", "--study", "two", "--workers", "2")
    procs = [start_sweep(recipe, tmp_path / sub, *args) for sub in ("a", "b")]
    try:
        texts = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    _check_study(study, texts, budget=10, workers=4)


def test_a_killed_local_worker_is_replaced_by_the_others(tmp_path: Path, tiny_workspace) -> None:
    """One of two local workers dies mid-trial (SIGKILL, as the OOM killer would): the run
    sees the exit and queues its trial again at once (not after the 60 s heartbeat grace),
    the other worker runs it and finishes the sweep; the run exits 1 and names the dead
    worker, how it ended and its last error output."""
    sweep = slow_sweep_recipe(trials=9, heartbeat={"interval": 1, "grace": 60})
    recipe = write_recipe(tmp_path / "k.yaml", sweep)
    out = tmp_path / "report"
    proc = start_sweep(recipe, out, "--workers", "2")
    storage = f"sqlite:///{out / 'sweep.db'}"

    def local_worker(t: optuna.trial.FrozenTrial) -> bool:  # claimed: its parameters are in
        worker = t.user_attrs.get("worker", "")
        return (
            t.number >= 2 and worker.startswith(socket.gethostname()) and "stages" in t.user_attrs
        )

    try:
        victim = running_trial(proc, storage, local_worker)
        if victim is not None:
            os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        text, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, "no trial was caught running"
    assert proc.returncode == 1, text
    dead = victim.user_attrs["worker"]
    pid = dead.rsplit(":", 1)[1]
    named = re.search(
        rf"^error: worker [01] \(pid {pid}\) was killed by SIGKILL; (.+)$", text, re.M
    )
    assert named, text
    assert named[1] == "it wrote no error output" or named[1].startswith("its last error output: ")
    assert "message is above" not in text
    trials = sweep_study(out).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].system_attrs["failed_because"] == f"worker {dead} exited"
    assert retry[0].params == victim.params  # suggested while it was claimed
    assert retry[0].user_attrs["worker"] != dead
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 9
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
