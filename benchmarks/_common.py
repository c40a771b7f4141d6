"""What the benchmark scripts share (run them as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import csv
import datetime
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIDY_COLUMNS = ("what", "config", "metric", "value", "machine", "date", "commit")


def machine(env: dict) -> str:
    """``AMD EPYC x2, torch 2.13.0+cpu``: the machine column of every results row, from
    ``compress.workbench.environment()``."""
    return f"{env['processor']} x{env['cpu_count']}, torch {env['torch']}"


def commit() -> str:
    """The repository's short commit, with ``+dirty`` when the work tree has changes outside
    ``benchmarks/results``."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # results files a run (or a parallel one) writes do not make the code dirty
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!benchmarks/results",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def write_tidy(path: Path, rows: list[dict]) -> None:
    """Tidy rows (what, config, metric, value, machine, date, commit) to ``path``, written to a
    temporary name and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TIDY_COLUMNS, extrasaction="raise")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
