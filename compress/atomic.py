"""Files a user relies on are written whole or not at all.

:func:`write_bytes` / :func:`write_text` write to a temporary name in the same folder, flush
it to disk and rename it over the target: a reader sees the old file or the new one, never
half of either, whatever kills the writer (SIGKILL, a full disk, a power cut after fsync).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TMP_PREFIX = ".tmp-"  # a temporary file's name: .tmp-<name>.<random>


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be
    opened (not POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Replace `path` with `data` atomically (temporary file, fsync, rename, fsync of the
    folder). On any error the target is unchanged and the temporary file removed."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """:func:`write_bytes` of `text` encoded as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), mode)
