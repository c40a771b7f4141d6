"""Cross-process locks on files, for work two processes must not do at once.

``fcntl.flock`` on a lock file (created if missing, never removed: removing it would let a
third process lock a new file while the second still holds the old one). The kernel drops the
lock when its holder dies, so a killed process never wedges the others; closing the descriptor
releases it. Where ``fcntl`` does not exist (Windows) nothing is locked and the caller is told.

Locks that are not about one of the user's folders (the cache's are) live in the machine's
lock folder, ``$COMPRESS_LOCK_DIR`` or ``<tmp>/compress-locks``, shared by every user like /tmp.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

ENV_LOCK_DIR = "COMPRESS_LOCK_DIR"


def default_lock_dir() -> Path:
    """``$COMPRESS_LOCK_DIR`` if set, else ``<tempfile.gettempdir()>/compress-locks``."""
    env = os.environ.get(ENV_LOCK_DIR)
    if env:
        return Path(env)
    import tempfile  # only here: it is not free to import

    return Path(tempfile.gettempdir()) / "compress-locks"


def shared_dir(path: Path) -> Path:
    """``path`` as a folder, created (with its parents) writable by all users and sticky, like
    /tmp, when it does not exist; an existing folder is someone's and keeps its mode."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        pass
    else:
        try:
            os.chmod(path, 0o1777)
        except OSError:
            pass
    return path


def open_lock_file(path: Path) -> int:
    """A fresh open file description on ``path``, created readable and writable by all.

    flock needs no write access, so the file is opened read-only: a lock file another user
    created with a narrower mode still works. Opening without ``O_CREAT`` first keeps
    ``fs.protected_regular`` from refusing another user's file in a sticky folder.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        fd = os.open(path, flags | os.O_CREAT, 0o666)
        try:
            os.fchmod(fd, 0o666)  # undo the umask so other users can open it too
        except OSError:
            pass
        return fd


@contextlib.contextmanager
def exclusive(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (its folder created if missing) for the block,
    waiting as long as another process holds it; ``waiting`` is called once, before the wait,
    when one does. Yields True, or False without locking where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing the descriptor drops the lock
