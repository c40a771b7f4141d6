"""Where a report came from: when, by which command, on which host, from which commit.

Package versions and the hardware are the environment's (:func:`compress.workbench.environment`);
this is the rest a reader needs to reproduce a report or to tell two apart.
"""

from __future__ import annotations

import datetime as dt
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import compress


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(path: Path | None = None) -> str:
    """The commit the compress source (or ``path``) is checked out at, ``(modified)`` when its
    tracked files differ from it; why there is none otherwise."""
    where = Path(path) if path is not None else Path(compress.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], where)
    if not commit:
        return "none (not a git checkout)"
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return commit + (" (modified)" if dirty else "")


def command_line() -> str:
    """The command that started this process, as a shell would take it."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def provenance() -> dict[str, str]:
    """``generated`` (UTC), ``command``, ``host``, ``working directory``, ``compress commit``."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return {
        "generated": now.isoformat().replace("+00:00", " UTC"),
        "command": command_line(),
        "host": socket.gethostname(),
        "working directory": str(Path.cwd()),
        "compress commit": git_commit(),
    }
