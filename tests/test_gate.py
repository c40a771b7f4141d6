"""The machine gate: cross-process semantics, and that gated latency matches latency alone.

Other processes are started with the "spawn" context (the gate must work in a fresh
interpreter, not just in a forked copy); their targets live at module level so they pickle.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compress import gate
from compress.gate import MachineGate

CTX = mp.get_context("spawn")
START_TIMEOUT = 60.0  # seconds for a spawned child to import and report in (slow CI)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock gate: Linux")


# -- child process targets ----------------------------------------------------------------------


def _hold(g: MachineGate, inside, release) -> None:
    """Compute without a checkpoint until told to stop."""
    with g.computing():
        inside.set()
        release.wait(120)


def _loop(g: MachineGate, counter, started, stop, work_s: float) -> None:
    """Compute in steps of ``work_s``, counting steps, with a checkpoint between steps."""
    gate.install(g)  # exercise the module-level checkpoint()
    with g.computing():
        started.set()
        while not stop.is_set():
            with counter.get_lock():
                counter.value += 1
            time.sleep(work_s)
            gate.checkpoint()


def _hold_and_fork(g: MachineGate, inside, grandchild_pid) -> None:
    """Hold the gate shared, fork a child that outlives us, then sleep (to be SIGKILLed)."""
    with g.computing():
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(120)
            finally:
                os._exit(0)
        grandchild_pid.value = pid
        inside.set()
        time.sleep(120)


def _background(
    g: MachineGate, ready, go, running, stop, steps, burst_s: float, cpus: set[int]
) -> None:
    """Busy 2-thread matmuls on ``cpus`` inside ``computing()``, a checkpoint every
    ``burst_s``; pauses (outside ``computing()``) while ``go`` is clear."""
    os.sched_setaffinity(0, cpus)  # before torch starts its threads, which inherit it
    import torch

    torch.set_num_threads(2)
    a = torch.randn(384, 384)
    a @ a
    ready.set()
    while not stop.is_set():
        if not go.wait(0.05):
            continue
        with g.computing():
            running.set()
            while go.is_set() and not stop.is_set():
                end = time.perf_counter() + burst_s
                while time.perf_counter() < end:
                    a @ a
                with steps.get_lock():
                    steps.value += 1
                g.checkpoint()
        running.clear()


# -- helpers ------------------------------------------------------------------------------------


def _pin_threads(cpus: set[int]) -> None:
    """Pin every thread of this process (torch's pool included) to ``cpus``."""
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass


@pytest.fixture
def two_cpus() -> Iterator[set[int]]:
    """At most two CPUs, to which this process is pinned for the test: a background process
    pinned to the same ones competes with it for them even on a machine with many cores."""
    before = os.sched_getaffinity(0)
    cpus = set(sorted(before)[:2])
    _pin_threads(cpus)
    yield cpus
    _pin_threads(before)


@pytest.fixture
def procs() -> Iterator[list]:
    """Processes a test starts; whatever is still alive at the end is killed."""
    started: list = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(10)


def _start(procs: list, target, *args) -> mp.Process:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def _kill(p: mp.Process) -> None:
    """SIGKILL ``p`` and reap it (not ``join()``: a forked grandchild may hold its sentinel)."""
    os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while p.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.exitcode is not None, "the killed process did not exit"


def _wait_for(ev, what: str) -> None:
    assert ev.wait(START_TIMEOUT), f"timed out waiting for {what}"


class ExclusiveInThread:
    """Takes ``g.exclusive()`` in a daemon thread, so the test can watch it wait."""

    def __init__(self, g: MachineGate) -> None:
        self.g = g
        self.acquired = threading.Event()
        self.release = threading.Event()
        self.waited: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.g.exclusive() as waited:
            self.waited = waited
            self.acquired.set()
            self.release.wait(120)

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _rw_held_by_anyone(g: MachineGate) -> bool:
    """Probe the rw lock from a fresh open file description (conflicts even in-process)."""
    import fcntl

    if not g.rw_path.exists():
        return False
    fd = os.open(g.rw_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock if it got one
    return False


# -- semantics ----------------------------------------------------------------------------------


def test_exclusive_waits_for_a_computing_process_without_checkpoint(tmp_path: Path, procs) -> None:
    g = MachineGate(tmp_path)
    inside, release = CTX.Event(), CTX.Event()
    _start(procs, _hold, g, inside, release)
    _wait_for(inside, "the child to compute")

    with g.computing():  # a timed-out exclusive leaves this process computing, as it was
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            with g.exclusive(timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
        assert g.is_computing and not g.is_exclusive
    ex = ExclusiveInThread(g)
    assert not ex.acquired.wait(0.5), "exclusive got in while another process computed"
    release.set()
    assert ex.acquired.wait(10), "exclusive did not get in after the other process finished"
    assert ex.waited is not None and ex.waited >= 0.4
    ex.finish()


def test_checkpoint_lets_exclusive_in_and_stops_progress(tmp_path: Path, procs) -> None:
    g = MachineGate(tmp_path)
    counter, started, stop = CTX.Value("l", 0), CTX.Event(), CTX.Event()
    _start(procs, _loop, g, counter, started, stop, 0.01)
    _wait_for(started, "the child to compute")
    deadline = time.monotonic() + 10
    while counter.value < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter.value >= 3, "the computing child makes no progress"

    with g.exclusive(timeout=10) as waited:  # the child checkpoints every 10 ms
        assert 0.0 <= waited < 5.0, f"exclusive took {waited:.2f} s despite checkpoints"
        before = counter.value
        time.sleep(0.5)
        during = counter.value
    assert during == before, f"the computing child advanced {during - before} steps while excluded"

    deadline = time.monotonic() + 10
    while counter.value <= during and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter.value > during, "the computing child did not resume after exclusive"
    stop.set()


def test_exclusive_is_not_starved_by_overlapping_readers(tmp_path: Path, procs) -> None:
    # Two readers whose shared holds overlap never leave the rw lock free on their own: only
    # the turnstile (writer preference) lets exclusive in.
    g = MachineGate(tmp_path)
    stop = CTX.Event()
    children = [(CTX.Value("l", 0), CTX.Event()) for _ in range(2)]
    for counter, started in children:
        _start(procs, _loop, g, counter, started, stop, 0.005)
    for _, started in children:
        _wait_for(started, "the children to compute")
    with g.exclusive(timeout=10):
        before = [c.value for c, _ in children]
        time.sleep(0.3)
        assert [c.value for c, _ in children] == before
    stop.set()


def test_sigkilled_holder_does_not_block_exclusive(tmp_path: Path, procs) -> None:
    g = MachineGate(tmp_path)
    inside, release = CTX.Event(), CTX.Event()
    p = _start(procs, _hold, g, inside, release)
    _wait_for(inside, "the child to compute")

    ex = ExclusiveInThread(g)
    assert not ex.acquired.wait(0.3)
    _kill(p)
    assert ex.acquired.wait(10), "a SIGKILLed process's shared lock blocked exclusive"
    ex.finish()


def test_forked_child_does_not_keep_a_dead_parents_lock(tmp_path: Path, procs) -> None:
    g = MachineGate(tmp_path)
    inside, grandchild = CTX.Event(), CTX.Value("l", 0)
    p = _start(procs, _hold_and_fork, g, inside, grandchild)
    _wait_for(inside, "the child to compute and fork")
    try:
        assert _rw_held_by_anyone(g)
        _kill(p)
        ex = ExclusiveInThread(g)
        assert ex.acquired.wait(10), "a forked child kept its dead parent's shared lock"
        ex.finish()
    finally:
        try:
            os.kill(grandchild.value, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_exclusive_inside_computing_does_not_deadlock(tmp_path: Path, procs) -> None:
    g = MachineGate(tmp_path)
    states: list[tuple[str, bool]] = []

    def nested() -> None:
        with g.computing():
            states.append(("computing", _rw_held_by_anyone(g)))
            with g.computing():  # reentrant
                with g.exclusive() as waited:
                    states.append(("waited", waited < 5.0))
                    assert g.is_exclusive
                    g.checkpoint()  # a no-op while exclusive
                    with g.exclusive() as inner:  # exclusive nests too
                        states.append(("inner", inner == 0.0))
                    assert g.is_exclusive
                g.checkpoint()
            states.append(("still shared", _rw_held_by_anyone(g) and g.is_computing))
        states.append(("released", not _rw_held_by_anyone(g) and not g.is_computing))

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(15)
    assert not t.is_alive(), f"deadlock: exclusive inside computing never returned ({states})"
    assert states == [
        ("computing", True),
        ("waited", True),
        ("inner", True),
        ("still shared", True),
        ("released", True),
    ]

    # While this process computes, another process's exclusive waits for our checkpoint.
    counter, started, stop = CTX.Value("l", 0), CTX.Event(), CTX.Event()
    with g.computing():
        _start(procs, _loop, g, counter, started, stop, 0.01)
        _wait_for(started, "the child to compute")
        with g.exclusive(timeout=10):
            before = counter.value
            time.sleep(0.3)
            assert counter.value == before
        stop.set()


def test_module_level_functions_are_no_ops_without_a_gate() -> None:
    previous = gate.current()
    gate.install(None)
    try:
        assert gate.current() is None
        assert gate.checkpoint() is None
        with gate.exclusive() as waited:
            assert waited == 0.0
        with gate.computing():
            pass
        t0 = time.perf_counter()
        for _ in range(100_000):
            gate.checkpoint()
        assert time.perf_counter() - t0 < 1.0, "checkpoint() without a gate is not cheap"
    finally:
        gate.install(previous)


def test_install_routes_module_level_functions(tmp_path: Path) -> None:
    previous = gate.current()
    g = MachineGate(tmp_path, name="routed")
    gate.install(g)
    try:
        assert gate.current() is g
        gate.checkpoint()  # not computing: a no-op
        assert not _rw_held_by_anyone(g)
        with gate.exclusive():
            assert g.is_exclusive and _rw_held_by_anyone(g)
        assert not _rw_held_by_anyone(g)
        with gate.computing():
            assert g.is_computing and _rw_held_by_anyone(g)
        assert not g.is_computing and not _rw_held_by_anyone(g)
    finally:
        gate.install(previous)


def test_default_lock_dir_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_LOCK_DIR", str(tmp_path / "locks"))
    g = MachineGate()
    assert g.lock_dir == tmp_path / "locks"
    with g.computing():
        assert (tmp_path / "locks").is_dir() and g.rw_path.exists()
    # created by the gate: shared with other users
    assert (tmp_path / "locks").stat().st_mode & 0o1777 == 0o1777
    assert g.rw_path.stat().st_mode & 0o777 == 0o666
    monkeypatch.delenv("COMPRESS_LOCK_DIR")
    assert MachineGate().lock_dir.name == "compress-locks"
    with pytest.raises(ValueError):
        MachineGate(tmp_path, name="../x")


# -- the timing requirement -------------------------------------------------------------------


def test_gated_latency_matches_latency_alone(tmp_path: Path, procs, two_cpus) -> None:
    """A variant's latency measured while another worker computes stays within 10% of the
    same measurement alone.

    Each round measures a tiny GPT's forward latency gated and un-gated (in alternating order)
    while the background computes with 2 threads on the same (at most) two CPUs and
    checkpoints every 30 ms, between two measurements alone (the background paused); the
    median over rounds of gated / alone is compared with 1.

    Processes outside the gate (other users, other test runs) are noise this test cannot
    remove: a round counts only when the alone measurements around it are quiet (IQR under
    15% of the median, about 5% on a quiet machine, and within a time cap) and agree within
    10%, and the test skips when fewer than 3 steady rounds fit in its time budget. The
    un-gated measurement only shows that the background disturbs the machine at all; if it
    does not (by 15%), the test skips too, as it would prove nothing.
    """
    import torch

    from compress.evaluate.latency import interleaved_latency, quartiles
    from compress.models.gpt import GPT, PRESETS, GPTConfig

    torch.manual_seed(0)
    vocab = 1024
    model = GPT(GPTConfig(vocab_size=vocab, **PRESETS["tiny"])).eval()
    g = MachineGate(tmp_path)
    ready, go, running, stop = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Event()
    steps = CTX.Value("l", 0)
    _start(procs, _background, g, ready, go, running, stop, steps, 0.03, two_cpus)

    def measure(repeats: int, cap_s: float) -> tuple[float, float] | None:
        """Median forward latency (ms) and IQR / median, or None past ``cap_s`` seconds.

        8 x 128 tokens: a forward pass longer than a scheduler time slice (a few ms), so
        contention shows in the median; shorter ones often run a whole slice undisturbed.
        Timed in chunks so that an oversubscribed machine (passes 100x slower) is given up on.
        """
        samples: list[float] = []
        end = time.perf_counter() + cap_s
        while len(samples) < repeats:
            if time.perf_counter() > end:
                return None
            r = interleaved_latency({"m": model}, vocab, 8, 128, threads=2, warmup=1, repeats=10)
            samples += r["m"].samples_ms
        q25, q50, q75 = quartiles(samples)
        return q50, (q75 - q25) / q50

    def background(on: bool) -> None:
        if on:
            go.set()
            _wait_for(running, "the background to compute")
            time.sleep(0.1)  # let it get going
        else:
            go.clear()
            deadline = time.monotonic() + 10
            while running.is_set() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert not running.is_set(), "the background did not pause"

    def gated() -> tuple[float, float] | None:
        with g.exclusive(timeout=30):
            return measure(40, 3.0)

    def ungated() -> tuple[float, float] | None:
        return measure(20, 3.0)  # fewer: only shows that the background disturbs

    _wait_for(ready, "the background to start")
    measure(20, 30.0)  # warm up this process
    # A round is gated and un-gated (in alternating order) between two alone measurements.
    # Each is taken as a ratio to the mean of the alone measurements around it, and a round
    # counts only when those two are quiet and agree within 10%: this machine's speed drifts
    # by 20% and more over seconds (other tenants), which pairing cancels and steadiness
    # checks keep out, so that neither is blamed on (or credited to) the gate.
    ratios: dict[str, list[float]] = {"gated": [], "ungated": []}
    dropped = r = 0
    budget = time.monotonic() + 30.0
    background(False)
    before = measure(40, 3.0)
    while len(ratios["gated"]) < 7 and time.monotonic() < budget:
        r += 1
        pending: dict[str, float] = {}
        pair = [("gated", gated), ("ungated", ungated)]
        for name, fn in pair if r % 2 else pair[::-1]:
            background(True)
            m = fn()
            pending[name] = m[0] if m is not None else float("inf")  # overran its time cap
        background(False)
        after = measure(40, 3.0)
        steady = (
            before is not None
            and after is not None
            and max(before[1], after[1]) <= 0.15
            and abs(after[0] / before[0] - 1) <= 0.10
        )
        if steady:
            alone = (before[0] + after[0]) / 2
            for name, value in pending.items():
                ratios[name].append(value / alone)
        else:
            dropped += 1
            time.sleep(0.5)  # something outside the gate computes: wait for a quiet moment
            after = measure(40, 3.0)
        before = after
    stop.set()

    n = len(ratios["gated"])
    if n < 3:
        pytest.skip(
            f"machine busy outside the gate: {n} steady rounds in the time budget "
            f"({dropped} of {r} rounds dropped)"
        )
    assert steps.value > 0, "the background never computed"
    med = {k: statistics.median(v) for k, v in ratios.items()}
    report = (
        f"gated {med['gated']:.3f}x alone, ungated {med['ungated']:.3f}x (medians of {n} "
        f"steady rounds of {r}): "
        + ", ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in ratios.items())
    )
    print(report)  # shown with -s
    if med["ungated"] < 1.15:
        pytest.skip(
            f"the background does not disturb this machine, so this proves nothing: {report}"
        )
    assert abs(med["gated"] - 1) <= 0.10, report
