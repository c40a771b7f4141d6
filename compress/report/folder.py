"""The report folder: one writer at a time, only a folder compress owns, published whole.

    with claim(out_dir, "run") as folder:       # lock + ownership check, before any work
        with folder.staged() as staging:       # an empty sibling folder
            ...write everything into staging...
        # here the old report was swapped for the new one in one rename

* Ownership: compress writes a marker file (:data:`MARKER`) into every report folder it
  creates. A folder that exists, is not empty and has no marker belongs to someone else and
  is refused; so is a sweep's folder for a plain run and the reverse (a plain run replaces
  its whole folder, which would lose a sweep's study).
* One writer: an ``fcntl.flock`` on ``.<name>.compress-lock`` beside the folder (not in it:
  the folder itself is swapped). A plain run takes it exclusively; sweeps take it shared,
  since several sweep commands may join one study on purpose.
* No mixed report: a plain run writes everything (variant checkpoints, CSV, JSON, HTML,
  study) into a staging folder beside the target and swaps the two with one
  ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames, and the next run puts the
  old report back if it was killed between them). Until that rename the previous report is
  untouched; after it, the new one is complete. Leftovers of a killed run are removed by the
  next run that claims the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from compress import atomic
from compress.errors import CompressError

log = logging.getLogger(__name__)

Kind = Literal["run", "sweep"]
MARKER = ".compress-report"  # {"written_by": "compress", "kind": "run" | "sweep"}
LOCK_SUFFIX = ".compress-lock"
STAGING = ".staging-"  # .<name>.staging-<random>: a run's output before it is published
OLD = ".old-"  # .<name>.old-<random>: the previous report between two renames (fallback)
TOKEN_BYTES = 6  # <random>: that many random bytes in hex; a name of this form is ours

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class ReportFolderError(CompressError):
    """The report folder cannot be used: someone else's, busy, or not writable."""


def _marker_text(kind: Kind) -> str:
    return json.dumps({"written_by": "compress", "kind": kind}) + "\n"


def _marker_kind(folder: Path) -> str | None:
    """The kind recorded in `folder`'s marker; None when there is no readable marker."""
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else None


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk before it is published."""
    for here, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        atomic.fsync_dir(here)


class ReportFolder:
    """A report folder this process holds the lock of (see :func:`claim`)."""

    def __init__(self, shown: Path, real: Path, kind: Kind, lock_fd: int) -> None:
        self.path = shown  # as the user gave it, for messages
        self.real = real  # symlinks resolved: what is created, swapped and locked
        self.kind = kind
        self._lock_fd: int | None = lock_fd

    def __enter__(self) -> ReportFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock (also released when the process dies, however it dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _sibling(self, tag: str) -> Path:
        return self.real.with_name(f".{self.real.name}{tag}{secrets.token_hex(TOKEN_BYTES)}")

    def ensure(self) -> Path:
        """Create the folder and its marker if they are missing (a sweep writes in place)."""
        try:
            self.real.mkdir(parents=True, exist_ok=True)
            if _marker_kind(self.real) is None:
                atomic.write_text(self.real / MARKER, _marker_text(self.kind))
        except OSError as exc:
            raise ReportFolderError(
                f"{self.path}: cannot create the report folder: {exc.strerror or exc}"
            ) from None
        return self.real

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """An empty staging folder to write the whole report into; published in one rename
        when the block ends normally, removed (the old report untouched) when it raises."""
        staging = self._sibling(STAGING)
        try:
            staging.mkdir()
            atomic.write_text(staging / MARKER, _marker_text(self.kind))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ReportFolderError(
                f"{self.path}: cannot write the report: {exc.strerror or exc}"
            ) from None
        try:
            yield staging
            self._publish(staging)
        except OSError as exc:  # a full disk, a read-only folder, ...
            raise ReportFolderError(
                f"{self.path}: cannot write the report: {exc.strerror or exc}; "
                "the previous report is unchanged"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, staging: Path) -> None:
        """Put `staging` where the report folder is; the previous one is removed after."""
        _fsync_tree(staging)
        parent = self.real.parent
        sys.audit("compress.report.publish", str(staging), str(self.real))  # the one swap
        if not self.real.exists():
            os.rename(staging, self.real)
        else:
            try:
                _exchange(staging, self.real)  # the old report is now at `staging`
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
                    raise
                old = self._sibling(OLD)
                os.rename(self.real, old)
                os.rename(staging, self.real)
                shutil.rmtree(old, ignore_errors=True)
        atomic.fsync_dir(parent)
        log.info("published the report in %s", self.path)

    def _recover(self) -> None:
        """Remove what a killed run left beside the folder; put back a previous report that
        was moved aside by the two-rename fallback and never replaced."""
        ours = re.compile(
            rf"\.{re.escape(self.real.name)}({re.escape(STAGING)}|{re.escape(OLD)})"
            rf"[0-9a-f]{{{2 * TOKEN_BYTES}}}"
        )
        leftovers = [p for p in self.real.parent.iterdir() if ours.fullmatch(p.name)]
        for p in leftovers:
            if OLD in p.name and not self.real.exists():
                os.rename(p, self.real)
                log.warning("%s: restored the previous report of an interrupted run", self.path)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _lock(shown: Path, real: Path, kind: Kind) -> int:
    lock_path = real.with_name(f".{real.name}{LOCK_SUFFIX}")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ReportFolderError(
            f"{shown}: cannot create the report folder's lock {lock_path.name} in "
            f"{real.parent}: {exc.strerror or exc}"
        ) from None
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if kind == "run" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ReportFolderError(
                f"{shown}: another compress run is writing this report folder; wait for it to "
                "finish or choose another --report-dir / report.dir"
            ) from None
        raise ReportFolderError(f"{shown}: cannot lock {lock_path}: {exc.strerror}") from None
    return fd


def _check_owner(shown: Path, real: Path, kind: Kind) -> None:
    if real.exists() and not real.is_dir():
        raise ReportFolderError(f"{shown}: is a file, not a folder; choose a report folder")
    if not real.is_dir():
        return
    try:
        entries = os.listdir(real)
    except OSError as exc:
        raise ReportFolderError(f"{shown}: cannot read the folder: {exc.strerror}") from None
    if not entries:
        return
    found = _marker_kind(real)
    if found is None:
        raise ReportFolderError(
            f"{shown}: not empty and not a report folder written by compress (no {MARKER} "
            "file); choose a new or empty folder (--report-dir / report.dir)"
        )
    if found != kind:
        raise ReportFolderError(
            f"{shown}: holds a compress {found}'s report; a {kind} would replace it: choose "
            "another folder (--report-dir / report.dir)"
        )


def claim(path: str | Path, kind: Kind) -> ReportFolder:
    """Lock the report folder `path` for a `kind` of run and check that compress owns it.

    Raises :class:`ReportFolderError` (one line) when another run holds it, when it exists
    and is not empty without compress's marker, when it holds the other kind of report, or
    when it cannot be created. Writes nothing into the folder itself.
    """
    shown = Path(path)
    real = Path(os.path.realpath(shown))
    fd = _lock(shown, real, kind)
    folder = ReportFolder(shown, real, kind, fd)
    try:
        _check_owner(shown, real, kind)
        folder._recover()
        _check_owner(shown, real, kind)  # a restored previous report is checked too
    except BaseException:
        folder.close()
        raise
    return folder


__all__ = ["MARKER", "ReportFolder", "ReportFolderError", "claim"]
