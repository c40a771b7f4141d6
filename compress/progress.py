"""Progress on the terminal: what is running now, on a TTY and in a log file alike.

Two shapes, chosen by whether the stream (stdout by default) is a terminal:

- on a TTY, a status line rewritten in place (``\\r``) while a phase runs, and tqdm bars;
- anywhere else (a log file, a pipe, CI), whole lines only: a phase's start, its end when it
  took a while, and a counted loop's position every ``every_pct`` percent or ``every_s``
  seconds, whichever comes first; never a carriage return.

A :class:`Progress` is handed to the code that runs the phases (the workbench keeps one on its
workspace); it does nothing when disabled. :func:`bar` is the counted-loop shape on its own,
for loops such as training that only know whether progress is wanted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

SLOW_S = 2.0  # a phase that took at least this long gets a closing line with its time
EVERY_S = 10.0  # a plain (non-TTY) counted loop writes at least this often...
EVERY_PCT = 10  # ...or every this many percent, whichever comes first
WIDTH = 80  # status lines are cut to this width


def is_tty(stream: TextIO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def _fit(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


class LineBar:
    """tqdm's ``update``/``set_postfix``/``close`` as whole lines: ``desc: 30/100 step (30%)
    loss=3.21, 12.0 s``, written every ``every_pct`` percent or ``every_s`` seconds and once at
    the end, so a log gets tens of lines, not one per step."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        stream: TextIO | None = None,
        every_s: float = EVERY_S,
        every_pct: int = EVERY_PCT,
        clock: Any = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.stream = stream
        self.every_s, self.every_pct = every_s, every_pct
        self.clock = clock
        self.start = self.last_time = clock()
        self.last_pct = self._pct()
        self.postfix = ""
        self.closed = False
        self.lines = 0

    def _pct(self) -> int:
        return int(100 * self.n / self.total) if self.total else 0

    def _write(self) -> None:
        stream = self.stream or sys.stdout
        of = f"/{self.total}" if self.total else ""
        pct = f" ({self._pct()}%)" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        text = f"{self.desc}: {self.n}{of} {self.unit}{pct}{post}, "
        text += _seconds(self.clock() - self.start)
        stream.write(_fit(text) + "\n")
        stream.flush()
        self.lines += 1
        self.last_time, self.last_pct = self.clock(), self._pct()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        step = self.every_pct and self.total and self._pct() >= self.last_pct + self.every_pct
        if step or now - self.last_time >= self.every_s:
            if not (self.total and self.n >= self.total):  # the last line is close()'s
                self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def bar(
    total: int | None,
    desc: str,
    enabled: bool = True,
    unit: str = "it",
    initial: int = 0,
    stream: TextIO | None = None,
) -> Any:
    """A progress bar for a counted loop: tqdm on a terminal, :class:`LineBar` elsewhere,
    nothing when disabled. Has ``update``, ``set_postfix`` and ``close``."""
    if not enabled:
        return _NoBar()
    stream = stream or sys.stdout
    if not is_tty(stream):
        return LineBar(total, desc, unit, initial, stream)
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        leave=False,
        unit=unit,
        file=stream,
        ncols=WIDTH - 1,  # a full-width line wraps on some terminals
        dynamic_ncols=False,
    )


class Progress:
    """Says what is running: ``with progress.phase("perplexity of int8"): ...``.

    ``keep`` decides whether a finished phase that took :data:`SLOW_S` or more leaves a line
    with its time (a run keeps them, a sweep's trials do not: each has its own line). On a TTY
    the running phase is a status line rewritten in place; elsewhere a phase writes a line
    when it starts (when ``keep``) and when it ends if it was slow.
    """

    def __init__(
        self, enabled: bool = True, stream: TextIO | None = None, keep: bool = True
    ) -> None:
        self.enabled = enabled
        self._stream = stream
        self.keep = keep
        self._status = ""  # the status line on screen now (TTY)

    @classmethod
    def off(cls) -> Progress:
        return cls(enabled=False)

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        return is_tty(self.stream)

    def line(self, text: str) -> None:
        """A line that stays (clearing a status line first)."""
        if not self.enabled:
            return
        self._clear()
        self.stream.write(_fit(text) + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._status and self.tty:
            self.stream.write("\r" + " " * len(self._status) + "\r")
            self._status = ""

    def _show(self, text: str) -> None:
        self._clear()
        self._status = _fit(text, WIDTH - 1)
        self.stream.write(self._status)
        self.stream.flush()

    @contextmanager
    def phase(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.monotonic()
        if self.tty:
            self._show(f"{what} ...")
        elif self.keep:
            self.line(f"{what} ...")
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = time.monotonic() - start
            self._clear()
            if ok and self.keep and seconds >= SLOW_S:
                self.line(f"{what}: done, {_seconds(seconds)}")

    def bar(self, total: int | None, desc: str, unit: str = "it", initial: int = 0) -> Any:
        self._clear()
        return bar(total, desc, self.enabled, unit, initial, self.stream)
