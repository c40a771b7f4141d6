"""A small sweep over the `tiny` baseline of the session cache, written as a recipe file."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import REPO, TINY_RECIPE

POSTGRES_ENV = "COMPRESS_TEST_POSTGRES_URL"

SWEEP: dict = {
    "trials": 8,
    "sampler": {"startup_trials": 3},
    # short enough that a test waits little for a silent worker, long enough that a worker
    # starved on a busy machine is not taken for dead
    "heartbeat": {"interval": 1, "grace": 10},
    "params": {
        "prune": {"choice": [False, True]},
        "sparsity": {"float": [0.1, 0.8], "step": 0.1, "when": {"prune": True}},
        "quantizer": {"choice": ["none", "int8", "cpu-int8"]},
    },
    "pipeline": [
        {"prune": {"sparsity": "$sparsity"}, "when": {"prune": True}},
        {"int8": {}, "when": {"quantizer": "int8"}},
        {"dynamic-int8": {}, "when": {"quantizer": "cpu-int8"}},
    ],
    "seeds": {"int8": {"quantizer": "int8"}, "prune50": {"prune": True, "sparsity": 0.5}},
}


def sweep_recipe(**sweep_overrides) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["name"] = "tiny-sweep"
    recipe.pop("variants")
    recipe["eval"]["memory"] = {"peak_rss": False}
    recipe["eval"]["latency"].update(repeats=3, warmup=1)
    # every trial also generates: two short continuations keep trials short
    recipe["eval"]["generation"] = {"prompts": 2, "prompt_tokens": 16, "new_tokens": 8}
    recipe["sweep"] = {**copy.deepcopy(SWEEP), **sweep_overrides}
    return recipe


def slow_sweep_recipe(**sweep_overrides) -> dict:
    """The tiny sweep with distillation after pruning: trials long enough (a second or more)
    to kill a worker in the middle of one."""
    recipe = sweep_recipe(**sweep_overrides)
    sweep = recipe["sweep"]
    sweep["params"]["steps"] = {"int": [20, 40], "step": 20, "default": 20, "when": {"prune": True}}
    sweep["pipeline"].insert(
        1, {"distill": {"train": {"max_steps": "$steps", "seq_len": 64}}, "when": {"prune": True}}
    )
    sweep["seeds"]["prune50"]["steps"] = 20
    return recipe


def start_sweep(recipe: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    """``python -m compress.run RECIPE --report-dir OUT --no-progress EXTRA`` in a child
    process started in OUT's parent, its stdout and stderr together in one text pipe."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compress.run",
            str(recipe),
            "--report-dir",
            str(out),
            "--no-progress",
            *extra,
        ],
        cwd=out.parent,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def sweep_study(out: Path, name: str = "tiny-sweep") -> optuna.Study:
    """The study of the sweep whose report folder (with its sweep.db) is `out`."""
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweep.db'}")


def running_trial(
    proc: subprocess.Popen,
    storage: str,
    pick: Callable[[optuna.trial.FrozenTrial], bool],
    timeout: float = 240,
) -> optuna.trial.FrozenTrial | None:
    """Poll the sweep's study until one of its RUNNING trials satisfies `pick`; None if the
    sweep ends or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            study = optuna.load_study(study_name="tiny-sweep", storage=storage)
        except Exception:  # not created yet
            continue
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for trial in running:
            if pick(trial):
                return trial
    return None


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def sweep_file(tmp_path: Path, tiny_workspace) -> Path:
    """A recipe file for the tiny sweep (the tiny baseline is trained once per session)."""
    return write_recipe(tmp_path / "tiny-sweep.yaml", sweep_recipe())


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the server, so that the workers also race to create Optuna's
    tables; the given database itself when creating one is not allowed."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} to a PostgreSQL URL to run the distributed-sweep test")
    import sqlalchemy as sa

    base = sa.engine.make_url(url)
    name = f"compress_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        reason = " ".join(str(exc.orig).split())
        pytest.skip(f"{POSTGRES_ENV}: no PostgreSQL answers at {base!r}: {reason}")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.ProgrammingError:  # not allowed to create databases: use the given one
        admin.dispose()
        yield url
        return
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(autouse=True)
def _fresh_result_cache(cache_root: Path) -> None:
    """Each test measures its own trials: no result reuse across tests."""
    import shutil

    shutil.rmtree(cache_root / "sweep-results", ignore_errors=True)
