"""Sweeps end to end on the `tiny` baseline: trial 0 and seeds, resume without recomputing,
failures and NaN recorded, Ctrl-C and a killed worker leave a study that a re-run completes."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy
from optuna.trial import TrialState

from compress import run as run_mod
from compress.sweep import objective, runner
from compress.sweep.driver import collect_trials
from tests.sweep.conftest import (
    running_trial,
    slow_sweep_recipe,
    start_sweep,
    sweep_recipe,
    sweep_study,
    write_recipe,
)

REPO = Path(__file__).resolve().parents[2]

REAL_MEASURE = objective.measure
REAL_RUN_WORKER = runner.run_worker


def _count_measure(monkeypatch: pytest.MonkeyPatch, fail=None) -> list[list[dict]]:
    """Record every pipeline `objective.measure` is asked to build; `fail(pipeline, n)` may
    raise or return a replacement measurement."""
    calls: list[list[dict]] = []
    real = REAL_MEASURE

    def measure(w, number, pipeline):
        calls.append(pipeline)
        if fail is not None:
            out = fail(pipeline, len(calls))
            if out is not None:
                return out
        return real(w, number, pipeline)

    monkeypatch.setattr(objective, "measure", measure)
    return calls


def optuna_dashboard_note(study: optuna.Study) -> str:
    """The study's note as optuna-dashboard stores it (system attributes, in chunks)."""
    from optuna_dashboard._note import get_note_from_system_attrs

    attrs = study._storage.get_study_system_attrs(study._study_id)
    return get_note_from_system_attrs(attrs, None)["body"]


def test_sweep_seeds_resumes_and_never_recomputes(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report"
    calls = _count_measure(monkeypatch)
    assert run_mod.main([str(sweep_file), "--report-dir", str(out), "--no-progress"]) == 0
    study = sweep_study(out)
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 8 and len(trials) == 8
    assert study.metric_names == ["perplexity", "latency_ratio", "weight_bytes"]

    # trial 0 is the baseline, then the seeds in recipe order
    t0, t1, t2 = trials[:3]
    assert (t0.user_attrs["seed"], t1.user_attrs["seed"], t2.user_attrs["seed"]) == (
        "baseline",
        "int8",
        "prune50",
    )
    assert t0.params == {"prune": False, "quantizer": "none"} and t0.system_attrs["pipeline"] == []
    assert t0.user_attrs["latency_ratio"] == 1.0 and t0.user_attrs["perplexity_ratio"] == 1.0
    assert t1.params == {"prune": False, "quantizer": "int8"}
    assert t2.params == {"prune": True, "sparsity": 0.5, "quantizer": "none"}
    # the numbers are measured, not copied: int8 is near-lossless and smaller, pruning sparse
    assert abs(t1.user_attrs["perplexity_ratio"] - 1) < 0.01
    assert t1.user_attrs["weight_bytes_ratio"] < 0.7
    assert abs(t2.user_attrs["sparsity"] - 0.5) < 0.01 and t2.user_attrs["perplexity_ratio"] > 1
    for t in done:
        # the dashboard's attributes are rounded to 6 significant digits; values are not
        shown = [t.user_attrs[k] for k in ("perplexity", "latency_ratio", "weight_bytes")]
        assert t.values == pytest.approx(shown, rel=1e-5)
        assert t.system_attrs["measured"]["perplexity"] == t.values[0]
        assert all(float(f"{v:.6g}") == v for v in shown)
        assert t.user_attrs["latency_ratio"] > 0
        # the noise flag is on every trial's record, for its terminal line and the reports
        assert isinstance(t.user_attrs["latency_noisy"], bool)
        # each trial's own report is attached for the dashboard, the baseline's included
        metas = optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
        assert sorted((m.filename, m.mimetype) for m in metas) == [
            (f"trial-{t.number}-record.json", "application/json"),
            (f"trial-{t.number}-report.html", "text/html"),
        ]
        html_meta = next(m for m in metas if m.filename.endswith(".html"))
        text = (out / "artifacts" / html_meta.artifact_id).read_text()
        assert f"Trial {t.number}" in text and "perplexity" in text
        assert not any(p.name.startswith(".") for p in (out / "artifacts").iterdir())
    note = optuna_dashboard_note(study)
    assert "Pareto front" in note and "recommended" in note

    # every distinct configuration was measured exactly once; repeats were reused
    keys = [t.user_attrs["config_key"] for t in done]
    assert len(calls) == len(set(keys))
    for t in done:
        first = min(
            u.number for u in done if u.user_attrs["config_key"] == t.user_attrs["config_key"]
        )
        assert (t.user_attrs["cached_from"] is None) == (t.number == first)

    frame = pd.read_csv(out / "trials.csv")
    assert list(frame["number"]) == list(range(8))
    assert (out / "report.html").read_text().count("Pareto") >= 1
    # the dashboard one-liner finds this study and its artifacts from the report folder
    from compress.dashboard import resolve

    assert resolve(out) == (
        f"sqlite:///{(out / 'sweep.db').resolve()}",
        (out / "artifacts").resolve(),
    )

    # re-running a finished sweep measures nothing and adds no trial
    monkeypatch.setattr(objective, "measure", _boom)
    assert run_mod.main([str(sweep_file), "--report-dir", str(out), "--no-progress"]) == 0
    assert len(sweep_study(out).trials) == 8

    # raising the budget continues the same study; earlier trials are left as they were, and
    # a configuration proposed again (here: int8's, queued by hand) reuses its result, while
    # a new one (also queued by hand: the sampler may well propose only repeats) is measured
    sweep_study(out).enqueue_trial(t1.params)
    fresh = next(
        p
        for p in ({"prune": True, "sparsity": x / 10, "quantizer": "int8"} for x in range(2, 9))
        if p not in [t.params for t in done]
    )
    sweep_study(out).enqueue_trial(fresh)
    bigger = write_recipe(tmp_path / "more.yaml", sweep_recipe(trials=11))
    calls = _count_measure(monkeypatch)
    assert (
        run_mod.main(
            [str(bigger), "--report-dir", str(out), "--no-progress", "--study", "tiny-sweep"]
        )
        == 0
    )
    again = sweep_study(out).get_trials()
    assert len([t for t in again if t.state == TrialState.COMPLETE]) == 11
    assert [t.values for t in again[:8]] == [t.values for t in trials]
    assert again[8].params == t1.params and again[8].user_attrs["cached_from"] == "trial 1"
    assert again[8].values == t1.values
    assert again[9].params == fresh and again[9].user_attrs["cached_from"] is None
    known, ws = set(keys), _ws()
    assert calls and all(objective.config_key(ws, p) not in known for p in calls)


def sweep_spec(path: Path):
    from compress.recipe import load_recipe

    return load_recipe(path).sweep


def _ws():
    from compress.recipe import recipe_from_dict
    from compress.workbench import prepare

    return prepare(recipe_from_dict(sweep_recipe(), "x.yaml", "x"), REPO, progress=False)


def _boom(*args, **kwargs):
    raise AssertionError("nothing may be measured again")


def test_failures_and_nan_are_recorded_and_the_sweep_goes_on(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(pipeline, n):  # the two seeds exactly
        if pipeline == [{"int8": {}}]:
            raise RuntimeError("bitsandbytes exploded")
        if pipeline == [{"prune": {"sparsity": 0.5}}]:
            return {"perplexity": math.nan, "weight_bytes": 1, "latency_ratio": 1.0}, {}
        return None

    calls = _count_measure(monkeypatch, fail)
    out = tmp_path / "report"
    path = write_recipe(tmp_path / "f.yaml", sweep_recipe(max_failures=40))
    assert run_mod.main([str(path), "--report-dir", str(out), "--no-progress"]) == 0
    trials = sweep_study(out).get_trials()
    by_seed = {t.user_attrs.get("seed"): t for t in trials}
    assert by_seed["int8"].state == TrialState.FAIL
    assert by_seed["int8"].user_attrs["error"] == "RuntimeError: bitsandbytes exploded"
    assert by_seed["prune50"].state == TrialState.FAIL
    assert (
        by_seed["prune50"].user_attrs["error"] == "FloatingPointError: objective perplexity is nan"
    )
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 8
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # a repeat of a failed configuration is not measured again but pruned, which Optuna's
    # samplers learn from (they ignore failed trials)
    key = by_seed["int8"].user_attrs["config_key"]
    repeats = [t for t in trials if t.user_attrs.get("config_key") == key and t.number != 1]
    assert all(t.state == TrialState.PRUNED for t in repeats)
    assert all("trial 1 failed (RuntimeError" in t.user_attrs["error"] for t in repeats)
    # int8 proposed again (queued by hand, so the test does not rely on the sampler)
    sweep_study(out).enqueue_trial(by_seed["int8"].params)
    path = write_recipe(tmp_path / "f.yaml", sweep_recipe(max_failures=40, trials=9))
    assert run_mod.main([str(path), "--report-dir", str(out), "--no-progress"]) == 0
    trials = sweep_study(out).get_trials()
    repeats = [t for t in trials if t.user_attrs.get("config_key") == key and t.number != 1]
    assert repeats and all(t.state == TrialState.PRUNED for t in repeats)
    assert all("trial 1 failed (RuntimeError" in t.user_attrs["error"] for t in repeats)
    assert sum(p == [{"int8": {}}] for p in calls) == 1
    html = (out / "report.html").read_text()
    assert "bitsandbytes exploded" in html
    # a failed measurement is not cached: fixed, it is measured again
    key = by_seed["int8"].user_attrs["config_key"]
    assert not objective.result_path(key).exists()


def test_ctrl_c_leaves_a_consistent_study_that_a_rerun_completes(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fired = []

    def interrupt(pipeline, n):
        if n == 3 and not fired:  # baseline, int8, then Ctrl-C while measuring prune50
            fired.append(n)
            raise KeyboardInterrupt
        return None

    calls = _count_measure(monkeypatch, interrupt)
    out = tmp_path / "report"
    assert run_mod.main([str(sweep_file), "--report-dir", str(out), "--no-progress"]) == 130
    trials = sweep_study(out).get_trials()
    assert [t.state for t in trials[:3]] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.FAIL,
    ]
    assert trials[2].user_attrs["error"] == "interrupted"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # the interrupted worker queued its trial again at once, for any worker still running
    (queued,) = [t for t in trials if t.state == TrialState.WAITING]
    assert queued.system_attrs["failed_trial"] == 2 and queued.params == trials[2].params
    assert (out / "report.html").is_file()  # the report of what is done is still written

    calls.clear()
    assert run_mod.main([str(sweep_file), "--report-dir", str(out), "--no-progress"]) == 0
    trials = sweep_study(out).get_trials()
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == trials[2].params and retry[0].user_attrs["seed"] == "prune50"
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 8
    assert [] not in calls and [{"int8": {}}] not in calls  # trials 0 and 1 not redone
    # ... nor run again as new trials (which reuse would hide from `calls`)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs.get("seed") for t in done if t.user_attrs.get("seed")) == {
        "baseline": 1,
        "int8": 1,
        "prune50": 1,
    }


def test_a_sweep_killed_and_restarted_at_once_finishes_every_seed(
    tmp_path: Path, tiny_workspace
) -> None:
    """SIGKILL the whole command while a seed runs, and restart it at once, well within the
    heartbeat grace (60 s): its trial is known dead (a process of this machine that is gone),
    failed and run again; completed trials are kept; every seed finishes."""
    sweep = slow_sweep_recipe(trials=7, heartbeat={"interval": 1, "grace": 60})
    path = write_recipe(tmp_path / "kill.yaml", sweep)
    out = tmp_path / "report"
    proc = start_sweep(path, out, start_new_session=True)
    storage = f"sqlite:///{out / 'sweep.db'}"
    try:
        caught = running_trial(
            proc, storage, lambda t: bool(t.user_attrs.get("seed")) and "stages" in t.user_attrs
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole command, mid-trial
        proc.wait()
    assert caught is not None, "no seed was caught running"
    victim = caught.number
    before = {
        t.number: t.values for t in sweep_study(out).get_trials() if t.state == TrialState.COMPLETE
    }
    assert sweep_study(out).get_trials()[victim].state == TrialState.RUNNING
    rerun = start_sweep(path, out)
    text, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, text
    trials = sweep_study(out).get_trials()
    by_number = {t.number: t for t in trials}
    for number, values in before.items():
        assert by_number[number].state == TrialState.COMPLETE
        assert by_number[number].values == values
        assert not re.search(rf"\] trial {number} \(", text), f"trial {number} was run again"
    assert by_number[victim].state == TrialState.FAIL
    assert f"trial {victim}: worker {caught.user_attrs['worker']} exited; failed and queued" in text
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == by_number[victim].params
    assert retry[0].user_attrs.get("seed") == by_number[victim].user_attrs.get("seed")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 7
    assert {t.user_attrs.get("seed") for t in done} >= {"baseline", "int8", "prune50"}
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def _fresh_running(proc: subprocess.Popen, storage: str) -> optuna.trial.FrozenTrial | None:
    """A running trial of the sweep that measures its configuration itself (no completed
    trial of the same configuration to reuse); None if the sweep ends first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        with contextlib.suppress(Exception):  # not created yet, or busy
            trials = optuna.load_study(study_name="tiny-sweep", storage=storage).get_trials()
            done = {
                t.user_attrs.get("config_key") for t in trials if t.state == TrialState.COMPLETE
            }
            for t in trials:
                key = t.user_attrs.get("config_key")
                if t.state == TrialState.RUNNING and t.number and key and key not in done:
                    return t
    return None


def _fail_while_stopped(pid: int, url: str, trial: optuna.trial.FrozenTrial) -> bool:
    """Stop the worker (SIGSTOP), and once its heartbeat is older than the grace period, fail
    its trial as another worker would; then let it go on (SIGCONT). False if the trial had
    finished before the stop, or the stopped process held the database."""
    from compress.sweep.claims import release_dead

    os.kill(pid, signal.SIGSTOP)
    try:
        rdb = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 5}},
            heartbeat_interval=1,
            grace_period=3,
        )
        study = optuna.load_study(study_name="tiny-sweep", storage=rdb)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if rdb.get_trial(trial._trial_id).state != TrialState.RUNNING:
                return False
            if any(r.number == trial.number for r in release_dead(study, rdb)):
                return True
            time.sleep(0.5)
        raise AssertionError(f"trial {trial.number} never went stale")
    except sqlalchemy.exc.OperationalError:  # stopped inside a write: try another trial
        return False
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_trial_taken_from_its_worker_is_reused_by_its_retry(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """As if the worker had been stopped past the heartbeat grace: while it measures the int8
    seed, another worker fails the trial and queues it again. The worker says so in one
    line, keeps the measurement in the result cache and goes on; the retry reuses it."""
    from compress.sweep.claims import requeue

    out = tmp_path / "report"
    taken: list[int] = []

    def take_away(pipeline, n):
        if pipeline == [{"int8": {}}] and not taken:
            study = sweep_study(out)
            (trial,) = study.get_trials(states=(TrialState.RUNNING,))
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            requeue(study, trial, "worker elsewhere:1 sent no heartbeat for 10 s")
            taken.append(trial.number)
        return None

    calls = _count_measure(monkeypatch, take_away)
    path = write_recipe(tmp_path / "lost.yaml", sweep_recipe(trials=4))
    assert run_mod.main([str(path), "--report-dir", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    (number,) = taken
    worker = sweep_study(out).get_trials()[number].user_attrs["worker"]
    assert (
        f"trial {number} ({worker}): another worker failed it while it ran here (no heartbeat "
        "within the grace period); its result is in the result cache for the retry"
    ) in text
    trials = sweep_study(out).get_trials()
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[number].params
    assert retry.user_attrs["cached_from"] == "cache"
    assert sum(p == [{"int8": {}}] for p in calls) == 1  # measured once, by the first try
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    collected = {r["number"]: r for r in collect_trials(sweep_study(out), sweep_spec(path))}
    assert collected[number]["error"] == (
        f"worker elsewhere:1 sent no heartbeat for 10 s; queued again as trial {retry.number}"
    )


@pytest.mark.slow
def test_a_worker_stopped_past_the_grace_goes_on_and_its_result_is_reused(
    tmp_path: Path, tiny_workspace
) -> None:
    """A worker stopped (SIGSTOP) past the heartbeat grace has its trial failed and queued
    again by another worker (here: the test); continued (SIGCONT), it finishes measuring,
    says in one line that the trial was taken from it, and goes on: the retry reuses the
    cached result, the study ends with exactly `trials` complete, nothing crashed."""
    sweep = slow_sweep_recipe(trials=5, heartbeat={"interval": 1, "grace": 3})
    path = write_recipe(tmp_path / "stop.yaml", sweep)
    out = tmp_path / "report"
    proc = start_sweep(path, out)  # one worker: the command itself
    url = f"sqlite:///{out / 'sweep.db'}"
    victim = None
    try:
        while victim is None and (caught := _fresh_running(proc, url)) is not None:
            if _fail_while_stopped(proc.pid, url, caught):
                victim = caught
        text, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, "no trial was caught running"
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "Cannot tell" not in text
    lost = [line for line in text.splitlines() if line.startswith(f"trial {victim.number} (")]
    assert lost == [
        f"trial {victim.number} ({victim.user_attrs['worker']}): another worker failed it "
        "while it ran here (no heartbeat within the grace period); its result is in the "
        "result cache for the retry"
    ], text
    trials = sweep_study(out).get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[victim.number].params
    assert retry.user_attrs["cached_from"] == "cache"  # not measured again
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 5
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_sweep_flags_need_a_sweep_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = REPO / "recipes" / "int8.yaml"
    assert run_mod.main([str(recipe), "--workers", "2", "--report-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--workers only apply to a recipe with a sweep: section" in err
    assert "Traceback" not in err


def test_bad_storage_is_one_line_and_exit_2(sweep_file: Path, tmp_path: Path, capsys) -> None:
    code = run_mod.main(
        [str(sweep_file), "--report-dir", str(tmp_path / "out"), "--storage", "nosuchdb://x"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: storage nosuchdb://x: cannot open") and "Traceback" not in err


def test_a_worker_that_crashes_fails_the_run_not_thesweep_study(
    sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from compress.sweep import driver

    # a worker process turns an unexpected error into one line and exit code 1 ...
    def crash(*args, **kwargs):
        raise RuntimeError("storage went away")

    monkeypatch.setattr(runner, "run_worker", crash)
    args = runner.WorkerArgs(
        str(sweep_file),
        str(tmp_path / "w"),
        f"sqlite:///{tmp_path / 'w.db'}",
        "tiny-sweep",
        1,
        2,
        1,
        1,
        False,
        False,
    )
    assert runner.worker_main(args) == 1
    err = capsys.readouterr().err
    assert "worker 1: failed: RuntimeError: storage went away" in err and "Traceback" not in err

    # ... and the run exits 1 and names it with its last error line, with the others' trials
    # reported
    monkeypatch.setattr(runner, "run_worker", REAL_RUN_WORKER)
    ended = [
        runner.WorkerExit(0, 101, 0),
        runner.WorkerExit(1, 102, 1, "worker 1: failed: RuntimeError: storage went away"),
    ]
    monkeypatch.setattr(driver, "spawn_workers", lambda args, echo, on_exit: ended)
    out_dir = tmp_path / "report"
    code = run_mod.main(
        [str(sweep_file), "--report-dir", str(out_dir), "--no-progress", "--workers", "2"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "error: worker 1 (pid 102) exited with code 1; its last error output: "
        "worker 1: failed: RuntimeError: storage went away"
    ) in err
    assert "Traceback" not in err and "message is above" not in err
    assert (out_dir / "report.html").is_file()
    assert sweep_study(out_dir).get_trials()[0].state == TrialState.COMPLETE  # the baseline


def test_a_sweep_cut_short_by_its_timeout_says_so_and_continues(
    tmp_path: Path, tiny_workspace, capsys: pytest.CaptureFixture
) -> None:
    path = write_recipe(tmp_path / "t.yaml", sweep_recipe(timeout_minutes=0.001))
    out = tmp_path / "report"
    assert run_mod.main([str(path), "--report-dir", str(out), "--no-progress"]) == 0
    done = len(sweep_study(out).get_trials(states=(TrialState.COMPLETE,)))
    assert done < 8
    text = capsys.readouterr().out
    assert f"stopped by sweep.timeout_minutes 0.001 at {done} of 8 completed trials" in text
    # without the cap the same command finishes the budget and says nothing of the kind
    path = write_recipe(tmp_path / "t.yaml", sweep_recipe())
    assert run_mod.main([str(path), "--report-dir", str(out), "--no-progress"]) == 0
    assert len(sweep_study(out).get_trials(states=(TrialState.COMPLETE,))) == 8
    assert "stopped by" not in capsys.readouterr().out
