"""Where a run's Optuna study lives: the files of a report folder, storage URLs, and the
command that opens them in the dashboard. Shared by the writers (`compress.report`,
`compress.sweep`) and the reader (`compress.dashboard`), so both name the same files."""

from __future__ import annotations

import shlex
from pathlib import Path

STUDY_FILE = "study.db"  # a plain run's study (SQLite)
SWEEP_FILE = "sweep.json"  # a sweep's pointer to its storage, study name and artifacts
ARTIFACT_DIR = "artifacts"  # each trial's own report, attached to its Optuna trial


def sqlite_url(db_path: str | Path) -> str:
    """The SQLAlchemy URL of an SQLite file; a relative path stays relative."""
    return f"sqlite:///{Path(db_path).as_posix()}"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def command_for(report_dir: str | Path) -> str:
    """The shell one-liner that opens the run in `report_dir` in optuna-dashboard."""
    return f"python -m compress.dashboard {shlex.quote(str(report_dir))}"
