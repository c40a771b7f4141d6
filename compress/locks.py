"""A blocking cross-process lock on a file, for work two processes must not do at once.

An ``fcntl.flock`` on a lock file (created if missing, never removed: removing it would let a
third process lock a new file while the second still holds the old one). The kernel drops the
lock when its holder dies, so a killed process never wedges the others; closing the descriptor
releases it. Where ``fcntl`` does not exist (Windows) nothing is locked and the caller is told.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` for the block, waiting for it as long as another
    process holds it; ``waiting`` is called once, before the wait, when one does. Yields True,
    or False without locking where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
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
