"""Progress: whole lines, not carriage returns, when the output is not a terminal."""

from __future__ import annotations

import io

from compress import progress as progress_mod
from compress.progress import LineBar, Progress, bar


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_plain_bar_writes_tens_of_lines_not_one_per_step() -> None:
    out, clock = io.StringIO(), Clock()
    b = LineBar(1000, "train baseline", "step", stream=out, clock=clock)
    for _ in range(1000):
        clock.now += 0.001  # 1 s in all: only the percentage makes lines
        b.update(1)
        b.set_postfix(loss="3.210")
    b.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 11, lines  # every 10%, and the end
    assert lines[-1].startswith("train baseline: 1000/1000 step (100%) loss=3.210, ")
    assert lines[0].startswith("train baseline: 100/1000 step (10%)")


def test_a_slow_plain_bar_writes_every_ten_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    b = LineBar(10_000, "distill", "step", stream=out, clock=clock)
    for _ in range(100):  # 1% of the steps, 6 s each: 600 s
        clock.now += 6.0
        b.update(1)
    assert len(out.getvalue().splitlines()) == 50  # one line per 10 s, not one per step


def test_plain_phases_are_lines_with_the_time_of_slow_ones(monkeypatch) -> None:
    out = io.StringIO()
    p = Progress(stream=out)
    with p.phase("corpus: reading"):
        pass
    monkeypatch.setattr(progress_mod, "SLOW_S", 0.0)
    with p.phase("int8: perplexity"):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "corpus: reading ..."
    assert lines[1] == "int8: perplexity ..."
    assert lines[2].startswith("int8: perplexity: done, ")
    assert len(lines) == 3


def test_phases_not_kept_say_nothing_in_a_log() -> None:
    out = io.StringIO()
    with Progress(stream=out, keep=False).phase("trial 3: latency"):
        pass
    assert out.getvalue() == ""


def test_on_a_terminal_a_phase_is_a_status_line_cleared_after() -> None:
    out = Tty()
    with Progress(stream=out).phase("int8: latency"):
        assert out.getvalue() == "int8: latency ..."
    assert out.getvalue().endswith("\r")
    assert out.getvalue().split("\r")[-2].strip() == ""  # blanked


def test_disabled_progress_writes_nothing() -> None:
    out = io.StringIO()
    p = Progress(enabled=False, stream=out)
    with p.phase("x"):
        b = p.bar(10, "y")
        b.update(10)
        b.close()
    assert out.getvalue() == ""


def test_bar_is_tqdm_on_a_terminal_and_lines_elsewhere() -> None:
    assert isinstance(bar(10, "x", stream=io.StringIO()), LineBar)
    tty = bar(10, "x", stream=Tty())
    assert type(tty).__module__.startswith("tqdm")
    tty.close()


def test_status_lines_fit_80_columns() -> None:
    out = Tty()
    with Progress(stream=out).phase("x" * 200):
        assert len(out.getvalue()) < 80
    plain = io.StringIO()
    with Progress(stream=plain).phase("y" * 200):
        pass
    assert all(len(line) <= 80 for line in plain.getvalue().splitlines())
