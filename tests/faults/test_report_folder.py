"""A report folder under faults: a kill or a full disk at any write, a second run at the
same time, a report folder that belongs to someone else.

The kill and full-disk tests fork a child that writes a whole run's output (a variant
checkpoint, CSV, JSON, HTML, study) over a previous report, with a Python audit hook that
SIGKILLs it (or fails with ENOSPC) at its i-th file-system write, for every i; the previous
report must then be there whole, or the new one whole, never a mix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from compress import atomic
from compress import run as run_mod
from compress.report import write_report
from compress.report.folder import MARKER, ReportFolderError, claim

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or sys.platform != "linux", reason="forks children; Linux only"
)


def _rows(tag: str) -> list[dict]:
    base = {"variant": "baseline", "status": "ok", "perplexity": 10.0, "latency_ms": 2.0}
    other = {"variant": f"int8-{tag}", "status": "ok", "perplexity": 10.5, "latency_ms": 1.0}
    scale = 1.0 if tag == "old" else 2.0
    return [
        {**base, "weight_bytes": 1000 * scale},
        {**other, "weight_bytes": 300 * scale},
    ]


def _write_run(out: Path, tag: str) -> None:
    """What `python -m compress.run` writes, with rows tagged `tag` in every file."""
    with claim(out, "run") as folder, folder.staged() as staging:
        variant = staging / "variants" / f"int8-{tag}"
        variant.mkdir(parents=True)
        atomic.write_bytes(variant / "model.bin", tag.encode() * 1000)
        write_report(
            staging,
            _rows(tag),
            name=f"run-{tag}",
            recipe_text=f"name: run-{tag}\n",
            meta={"run": tag},
            definitions={"perplexity": "exp of the mean NLL"},
            environment={"python": "3"},
        )


def _files(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _which(out: Path) -> str:
    """ "old" or "new": the run every file of the report folder comes from (asserts they
    all agree and each is whole)."""
    meta_run = json.loads((out / "results.json").read_text())["meta"]["run"]
    csv_variants = list(pd.read_csv(out / "results.csv")["variant"])
    tags = {
        "json": meta_run,
        "csv": csv_variants[1].removeprefix("int8-"),
        "html": "new" if "compress report: run-new" in (out / "report.html").read_text() else "old",
        "variant": next((out / "variants").iterdir()).name.removeprefix("int8-"),
    }
    storage = f"sqlite:///{out / 'study.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    tags["study"] = summary.study_name.removeprefix("run-")
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.values[2] for t in study.trials] == [r["weight_bytes"] for r in _rows(tags["study"])]
    assert len(set(tags.values())) == 1, f"a mixed report: {tags}"
    assert (out / MARKER).is_file()
    return meta_run


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


WRITE_EVENTS = {
    "os.rename",
    "os.replace",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.link",
    "os.truncate",
    "shutil.rmtree",
    "sqlite3.connect",
    "compress.report.publish",  # raised just before the swap of the old and new report
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _is_write(event: str, args: tuple) -> bool:
    if event in WRITE_EVENTS:
        return True
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return isinstance(flags, int) and bool(flags & WRITE_FLAGS)
    return False


def _in_child(
    at: int, action: Callable[[str], None], body: Callable[[], None]
) -> tuple[int, list[str]]:
    """Fork; the child runs `body` with `action(event)` called at its `at`-th file-system
    write (0-based; -1: never) and exits 0, 2 on a ReportFolderError, 3 on any other
    error. Returns the child's wait status and, if it was not killed, its writes' audit
    event names in order."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 3
        try:
            os.close(read_fd)
            seen: list[str] = []

            def hook(event: str, args: tuple) -> None:
                if _is_write(event, args):
                    seen.append(event)
                    if len(seen) - 1 == at:
                        action(event)

            sys.addaudithook(hook)
            try:
                body()
                code = 0
            except ReportFolderError:
                code = 2
            os.write(write_fd, " ".join(seen).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        count = pipe.read()
    _, status = os.waitpid(pid, 0)
    return status, count.split()


def _kill_self(event: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _no_space(event: str) -> None:
    if event not in ("os.remove", "os.rmdir", "shutil.rmtree"):  # removing needs no space
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def old_report(tmp_path: Path) -> tuple[Path, Path]:
    """A finished report in reports/r, and a pristine copy of it to restore from."""
    out = tmp_path / "reports" / "r"
    _write_run(out, "old")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    return out, pristine


def _restore(out: Path, pristine: Path) -> None:
    shutil.rmtree(out)
    shutil.copytree(pristine, out)


def _writes(out: Path, pristine: Path) -> list[str]:
    """The audit events of a whole run's writes over the previous report, in order."""
    status, events = _in_child(-1, _kill_self, lambda: _write_run(out, "new"))
    assert os.waitstatus_to_exitcode(status) == 0
    assert _which(out) == "new"
    _restore(out, pristine)
    assert len(events) >= 10, f"only {events} seen: the audit hook does not see the writer"
    assert events.count("compress.report.publish") == 1
    return events


def _points(events: list[str], every: bool) -> list[int]:
    """Every write, or the first write of each kind, the last write before the swap, the
    swap and the first and last writes after it."""
    if every:
        return list(range(len(events)))
    swap = events.index("compress.report.publish")
    firsts = {events.index(e) for e in set(events)}
    return sorted(firsts | {0, swap - 1, swap, swap + 1, len(events) - 1})


def _kill_test(old_report: tuple[Path, Path], every: bool) -> None:
    out, pristine = old_report
    before = _files(out)
    events = _writes(out, pristine)
    outcomes = {}
    for i in _points(events, every):
        status, _ = _in_child(i, _kill_self, lambda: _write_run(out, "new"))
        assert os.WIFSIGNALED(status), f"write {i}: the child was not killed"
        which = _which(out)  # whole, never mixed
        if which == "old":
            assert _files(out) == before, f"write {i} ({events[i]}): the previous report changed"
        outcomes[i] = which
        # the next run cleans up what the killed one left beside the folder
        with claim(out, "run"):
            assert _leftovers(out) == [], f"write {i} ({events[i]})"
        _restore(out, pristine)
    # killed up to the swap: the old report; after it: the new one
    swap = events.index("compress.report.publish")
    assert outcomes == {i: "old" if i <= swap else "new" for i in outcomes}


def test_a_kill_at_the_report_write_points_leaves_a_whole_report(old_report) -> None:
    _kill_test(old_report, every=False)


@pytest.mark.slow
def test_a_kill_at_every_report_write_leaves_a_whole_report(old_report) -> None:
    _kill_test(old_report, every=True)


def _full_disk_test(old_report: tuple[Path, Path], every: bool) -> None:
    out, pristine = old_report
    before = _files(out)
    events = _writes(out, pristine)
    swap = events.index("compress.report.publish")
    failed = 0
    points = _points(events, every)
    for i in points:
        status, _ = _in_child(i, _no_space, lambda: _write_run(out, "new"))
        code = os.waitstatus_to_exitcode(status)
        which = _which(out)
        where = f"write {i} ({events[i]})"
        if i > swap:  # only removals of the old report are left: they need no space
            assert code == 0 and which == "new", where
        elif code == 2:  # a ReportFolderError: one line at the CLI, exit 2
            assert which == "old" and _files(out) == before, where
            failed += 1
        else:  # only a mkdir of a folder that exists may absorb the error and go on
            assert code == 0 and which == "new" and events[i] == "os.mkdir", f"{where}: {code}"
        assert _leftovers(out) == [], f"write {i}: the staging folder was left behind"
        _restore(out, pristine)
    assert failed >= 3  # the points include writes of files, a rename and the swap


def test_a_full_disk_at_the_report_write_points_keeps_the_previous_report(old_report) -> None:
    _full_disk_test(old_report, every=False)


@pytest.mark.slow
def test_a_full_disk_at_every_report_write_keeps_the_previous_report(old_report) -> None:
    _full_disk_test(old_report, every=True)


def test_a_full_disk_is_one_line_from_the_cli(
    old_report, tiny_recipe_dict: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    out, _ = old_report
    before = _files(out)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_mod, "run_variants", lambda ws, staging, progress: [])
    monkeypatch.setattr(run_mod, "write_report", full_disk)
    monkeypatch.setattr(run_mod, "prepare", lambda *a, **k: _FakeWorkspace())
    monkeypatch.setattr(run_mod, "_meta", lambda *a: {})
    monkeypatch.setattr(run_mod, "_sections", lambda *a: [])
    code = run_mod.main([str(recipe), "--report-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"error: {out}: cannot write the report: No space left on device; "
        "the previous report is unchanged\n"
    )
    assert _files(out) == before and _leftovers(out) == []


class _FakeWorkspace:
    """Just what run() prints between preparing and writing."""

    class corpus:
        description = "fake"

    class baseline_info:
        partial = False  # a baseline whose training was cut short
        train = None  # a loaded model: no training curve

        @staticmethod
        def headline() -> str:
            return "baseline: fake"

    setup_seconds = 0.0


# ---------------------------------------------------------------- two runs, foreign folders


HOLD = textwrap.dedent(
    """
    import sys
    from compress.report.folder import claim
    with claim(sys.argv[1], "run"):
        print("holding", flush=True)
        sys.stdin.read()
    """
)


def test_a_second_run_on_the_same_folder_is_refused_at_once(
    old_report, tiny_recipe_dict: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    out, _ = old_report
    before = _files(out)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert first.stdout.readline() == "holding\n"  # the first run holds the folder

        def no_work(*args, **kwargs):
            raise AssertionError("the second run started working")

        monkeypatch.setattr(run_mod, "prepare", no_work)
        code = run_mod.main([str(recipe), "--report-dir", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and "another compress run is writing" in err
        assert _files(out) == before  # the first run's results are untouched
    finally:
        first.communicate("", timeout=60)
    assert first.returncode == 0
    with claim(out, "run"):  # released when the first run ends
        pass


def test_a_sweep_and_a_plain_run_exclude_each_other_but_sweeps_share(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "s"
    with claim(out, "sweep") as a, claim(out, "sweep") as b:
        a.ensure()
        b.ensure()
        with pytest.raises(ReportFolderError, match="another compress run is writing"):
            claim(out, "run")
    with pytest.raises(ReportFolderError, match="holds a compress sweep's report"):
        claim(out, "run")  # free now, but a plain run would replace the sweep's study


def test_report_dir_in_a_foreign_folder_is_refused_and_nothing_is_deleted(
    tiny_recipe_dict: dict, tmp_path: Path, capsys, monkeypatch
) -> None:
    foreign = tmp_path / "home" / "me"
    (foreign / "variants" / "int8").mkdir(parents=True)
    (foreign / "variants" / "int8" / "keep.txt").write_text("mine")
    (foreign / "results.csv").write_text("my,own,data\n")
    before = _files(foreign)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe_dict, "report": {"dir": str(foreign)}}))

    def no_work(*args, **kwargs):
        raise AssertionError("the run started working")

    monkeypatch.setattr(run_mod, "prepare", no_work)
    assert run_mod.main([str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {foreign}: not empty and not a report folder written by compress "
        f"(no {MARKER} file); choose a new or empty folder (--report-dir / report.dir)\n"
    )
    assert _files(foreign) == before
    assert sorted(p.name for p in foreign.iterdir()) == ["results.csv", "variants"]


def test_a_file_where_the_report_folder_should_be_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "report"
    path.write_text("not a folder")
    with pytest.raises(ReportFolderError, match="is a file, not a folder"):
        claim(path, "run")
    assert path.read_text() == "not a folder"


def test_the_two_rename_fallback_is_completed_by_the_next_run(old_report, monkeypatch) -> None:
    """Where renameat2 cannot swap, the old report is moved aside then the new one moved in;
    a kill between the two leaves no report folder, and the next claim puts the old back."""
    from compress.report import folder as folder_mod

    out, _ = old_report
    before = _files(out)

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "not supported here")

    monkeypatch.setattr(folder_mod, "_exchange", no_exchange)
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new report's rename: as if killed just before it
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(folder_mod.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        _write_run(out, "new")
    monkeypatch.setattr(folder_mod.os, "rename", real_rename)
    assert not out.exists()  # the old report is beside it, under its .old- name
    with claim(out, "run"):
        assert _files(out) == before and _leftovers(out) == []
    _write_run(out, "new")  # and the fallback path publishes whole when not interrupted
    assert _which(out) == "new" and _leftovers(out) == []
