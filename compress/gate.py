"""A machine-wide readers-writer gate, so latency is measured while no other process computes.

Several sweep workers on one machine train and evaluate while each also times forward passes;
a timing taken while another process computes measures the contention, not the model. The gate
is a cross-process readers-writer lock on two files in a shared folder:

* Computing holds the gate **shared** (``with gate.computing():``). Any number of processes
  compute at once. A computing loop calls ``gate.checkpoint()`` often (every optimizer step,
  every perplexity batch): it briefly releases and re-takes the shared lock, which is where a
  waiting exclusive holder gets in. Between checkpoints a process is never interrupted.
* A latency measurement holds the gate **exclusive** (``with gate.exclusive() as waited:``):
  it waits until every other computing process has reached a checkpoint (or left
  ``computing()``) and is blocked there, measures alone, then releases. ``waited`` is the
  number of seconds it waited for the lock.
* Writer preference: a waiting exclusive request is not starved by readers re-taking the lock.
  Readers pass a "turnstile" lock on their way in (turnstile EX, rw SH, turnstile UN); a writer
  holds the turnstile while it waits for and holds the rw lock, so readers that release at a
  checkpoint queue behind it.
* Nesting is safe. ``computing()`` is reference-counted. ``exclusive()`` inside ``computing()``
  first drops this process's shared lock (a process must not wait for itself) and takes it
  back afterwards, through the turnstile like any reader. ``exclusive()`` nests too;
  ``checkpoint()`` is a no-op outside ``computing()`` and while this process is exclusive.
* ``exclusive(timeout=...)`` raises ``TimeoutError`` instead of waiting past ``timeout``
  seconds (for a process that computes without checkpoints, say); without it, it waits.
* Locks are ``fcntl.flock`` locks, which the kernel drops when the process holding them dies,
  so a killed worker never wedges the others. Each lock uses its own open file description
  (flock locks belong to open file descriptions, not to processes or descriptors).
* Files are opened lazily by the process that uses them, and the pid that opened them is
  recorded: a gate pickled into a spawned child, or inherited by a forked one, opens its own
  descriptors there. Forked children also close inherited gate descriptors at once, so a
  lingering child (a data-loader worker, say) cannot keep a dead parent's lock alive.
* Machine-wide: the lock folder is ``$COMPRESS_LOCK_DIR`` if set, else
  ``<tempfile.gettempdir()>/compress-locks``; when the gate creates it, it makes it
  world-writable (sticky, like /tmp) and its lock files readable by all, so several users'
  processes share it (and any of them can hold it). Where ``fcntl.flock`` does not exist
  (Windows) the gate is a no-op and says so in a warning.

Limits: the gate is per process, meant to be used from one thread at a time (its bookkeeping is
thread-safe, but an exclusive section does not wait for *other threads* of the same process
that compute). Work that never calls ``checkpoint()`` inside ``computing()`` holds off a
measurement until it leaves ``computing()``. Spin-waiting thread pools (Intel OpenMP's
``KMP_BLOCKTIME``) may burn CPU for a short while after their process blocks at a checkpoint;
latency warm-up passes absorb it.

The process-wide gate is set with ``install()``; the module-level ``checkpoint()``,
``computing()`` and ``exclusive()`` use it, and are no-ops when none is installed, so library
loops can call ``checkpoint()`` unconditionally.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.locks import default_lock_dir, open_lock_file, shared_dir

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


# Gates of this process whose descriptors a forked child must drop (see _after_fork_in_child).
_open_gates: weakref.WeakSet[MachineGate] = weakref.WeakSet()


class MachineGate:
    """A readers-writer lock shared by every process on the machine that uses the same folder.

    ``name`` picks one of several independent gates in the folder (files ``<name>.turnstile``
    and ``<name>.rw``). Use one gate object per folder and name in a process (``install()``
    it): two objects on the same files in one process lock each other out like two processes.
    """

    def __init__(self, lock_dir: str | Path | None = None, name: str = "cpu") -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"gate name must be a plain file-name stem, got {name!r}")
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        self.name = name
        self.turnstile_path = self.lock_dir / f"{name}.turnstile"
        self.rw_path = self.lock_dir / f"{name}.rw"
        self.enabled = fcntl is not None and hasattr(fcntl, "flock")
        if not self.enabled:
            log.warning("fcntl.flock is unavailable: the machine gate %r is a no-op", name)
        self._init_state()

    def _init_state(self) -> None:
        self._mutex = threading.RLock()
        self._pid: int | None = None  # the process that opened the descriptors
        self._turnstile_fd: int | None = None
        self._rw_fd: int | None = None
        self._shared_depth = 0  # nesting of computing()
        self._exclusive_depth = 0  # nesting of exclusive()
        self._held = 0  # what this process holds on the rw file: 0, LOCK_SH or LOCK_EX

    # Pickling (spawn) carries the configuration only; the child opens its own descriptors.
    def __getstate__(self) -> dict:
        return {"lock_dir": self.lock_dir, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["lock_dir"], state["name"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"MachineGate(lock_dir={str(self.lock_dir)!r}, name={self.name!r})"

    @property
    def is_computing(self) -> bool:
        """Whether this process is inside ``computing()``."""
        return self._shared_depth > 0 and self._pid == os.getpid()

    @property
    def is_exclusive(self) -> bool:
        """Whether this process is inside ``exclusive()``."""
        return self._exclusive_depth > 0 and self._pid == os.getpid()

    # -- descriptors -------------------------------------------------------------------------

    def _fds(self) -> tuple[int, int]:
        """This process's (turnstile, rw) descriptors, opened on first use."""
        pid = os.getpid()
        if self._pid != pid:
            self._forget_inherited()
            try:
                shared_dir(self.lock_dir)
                self._turnstile_fd = open_lock_file(self.turnstile_path)
                self._rw_fd = open_lock_file(self.rw_path)
            except BaseException:
                self._close()
                raise
            self._pid = pid
            _open_gates.add(self)
            log.debug("gate %r opened in %s by pid %d", self.name, self.lock_dir, pid)
        assert self._turnstile_fd is not None and self._rw_fd is not None
        return self._turnstile_fd, self._rw_fd

    def _close(self) -> None:
        for fd in (self._turnstile_fd, self._rw_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._turnstile_fd = self._rw_fd = None
        self._pid = None

    def _forget_inherited(self) -> None:
        """In a child: drop the parent's descriptors and nesting, which are not this process's.

        Closing a copy does not release the parent's lock (the parent still has the open file
        description); it only stops this process from keeping that lock alive.
        """
        if self._pid is not None and self._pid != os.getpid():
            self._close()
            self._mutex = threading.RLock()
            self._shared_depth = self._exclusive_depth = 0
            self._held = 0

    def close(self) -> None:
        """Release whatever this process holds and close the descriptors (reopened on use)."""
        with self._mutex:
            if self._pid == os.getpid():
                self._close()  # closing the only descriptor releases its flock
            self._shared_depth = self._exclusive_depth = 0
            self._held = 0

    # -- raw lock operations (callers hold self._mutex) --------------------------------------

    def _release_rw(self) -> None:
        if self._held:
            _, rw = self._fds()
            self._held = 0
            fcntl.flock(rw, fcntl.LOCK_UN)

    def _acquire_shared(self) -> None:
        turnstile, rw = self._fds()
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # queue behind a waiting writer
        try:
            fcntl.flock(rw, fcntl.LOCK_SH)
            self._held = fcntl.LOCK_SH
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)

    def _acquire_exclusive(self, timeout: float | None) -> float:
        turnstile, rw = self._fds()
        start = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        if not _flock(turnstile, fcntl.LOCK_EX, deadline):  # other exclusive holders
            raise TimeoutError(f"gate {self.name!r}: another process held it for {timeout} s")
        try:
            if not _flock(rw, fcntl.LOCK_EX, deadline):  # computing processes, to checkpoint
                raise TimeoutError(
                    f"gate {self.name!r}: computing processes did not reach a checkpoint "
                    f"within {timeout} s"
                )
        except BaseException:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            raise
        self._held = fcntl.LOCK_EX
        return time.perf_counter() - start

    def _release_exclusive(self) -> None:
        turnstile, _ = self._fds()
        self._release_rw()  # rw first, then the turnstile: readers queue there meanwhile
        fcntl.flock(turnstile, fcntl.LOCK_UN)

    # -- public API --------------------------------------------------------------------------

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Hold the gate shared while computing; nests (reference-counted)."""
        if not self.enabled:
            yield
            return
        with self._mutex:
            self._forget_inherited()
            if self._shared_depth == 0 and self._exclusive_depth == 0:
                self._acquire_shared()
            self._shared_depth += 1
        try:
            yield
        finally:
            with self._mutex:
                self._shared_depth = max(0, self._shared_depth - 1)
                if self._shared_depth == 0 and self._exclusive_depth == 0:
                    self._release_rw()

    def checkpoint(self) -> None:
        """Let a waiting exclusive holder in: release and re-take the shared lock.

        Returns at once when no one waits. A no-op outside ``computing()``, while this process
        is exclusive, and in a forked child that has not entered ``computing()`` itself.
        """
        if self._shared_depth == 0 or self._exclusive_depth or self._pid != os.getpid():
            return
        with self._mutex:
            if self._shared_depth == 0 or self._exclusive_depth:
                return
            self._release_rw()
            self._acquire_shared()

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[float]:
        """Hold the gate exclusive: no other process computes until the block ends.

        Yields the seconds waited for the lock (0.0 when nested in another ``exclusive()``).
        Inside ``computing()``, this process's shared lock is dropped first and re-taken after.
        With ``timeout`` (seconds), raises ``TimeoutError`` if the lock is not had by then (a
        process computing without checkpoints, say); this process is left as it was.
        """
        if not self.enabled:
            yield 0.0
            return
        with self._mutex:
            self._forget_inherited()
            if self._exclusive_depth:
                self._exclusive_depth += 1
                waited = 0.0
            else:
                self._release_rw()  # not wait for ourselves; re-taken on the way out
                try:
                    waited = self._acquire_exclusive(timeout)
                except TimeoutError:
                    if self._shared_depth:
                        self._acquire_shared()
                    raise
                self._exclusive_depth = 1
        if waited > 1.0:
            log.info("gate %r: waited %.2f s for exclusive use of the machine", self.name, waited)
        try:
            yield waited
        finally:
            with self._mutex:
                self._exclusive_depth -= 1
                if self._exclusive_depth == 0:
                    self._release_exclusive()
                    if self._shared_depth:
                        self._acquire_shared()


def _flock(fd: int, op: int, deadline: float | None) -> bool:
    """``flock(fd, op)``, blocking until ``deadline`` (``time.monotonic()``; None: forever).

    Returns whether the lock was had. With a deadline it polls, backing off to 10 ms.
    """
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    log.debug("gate: waiting for a lock (op %d)", op)
    if deadline is None:
        fcntl.flock(fd, op)
        return True
    delay = 0.0005
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.01)
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass


def _after_fork_in_child() -> None:
    for g in list(_open_gates):
        g._forget_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_current: MachineGate | None = None


def install(gate: MachineGate | None) -> None:
    """Make ``gate`` this process's gate for the module-level functions (``None`` removes it)."""
    global _current
    _current = gate


def current() -> MachineGate | None:
    """This process's installed gate, or ``None``."""
    return _current


def checkpoint() -> None:
    """The installed gate's ``checkpoint()``; nearly free when none is installed."""
    g = _current
    if g is not None:
        g.checkpoint()


@contextmanager
def computing() -> Iterator[None]:
    """The installed gate's ``computing()``, or a no-op when none is installed."""
    g = _current
    if g is None:
        yield
        return
    with g.computing():
        yield


@contextmanager
def exclusive(timeout: float | None = None) -> Iterator[float]:
    """The installed gate's ``exclusive()``, or a no-op yielding 0.0 when none is installed."""
    g = _current
    if g is None:
        yield 0.0
        return
    with g.exclusive(timeout) as waited:
        yield waited
