"""Tests for compress.dashboard: what a report folder resolves to, and that the real
optuna-dashboard server it starts shows the study, its trials and each trial's artifacts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from compress.dashboard import DashboardError, main, open_storage, resolve
from compress.dashboard import resolve_source as _resolve_source
from compress.storage import command_for, sign_pointer

REPO = Path(__file__).resolve().parents[1]
METRICS = ["perplexity", "latency_ms", "weight_bytes"]
VALUES = [(10.0, 1.0, 100.0), (5.0, 2.0, 100.0), (12.0, 3.0, 200.0)]  # the 3rd is dominated
ARTIFACT = {"variant": "v1", "perplexity": 5.0, "note": "attached to trial 1"}


@dataclass
class Sweep:
    folder: Path
    storage: str
    artifact_id: str
    artifact_bytes: bytes


def _make_study(storage: str, name: str, artifact_dir: Path | None) -> tuple[str, bytes]:
    """A 3-objective study: three COMPLETE trials, one FAIL, an artifact on trial 1."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize"] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRICS)
    artifact_id, data = "", b""
    for number, values in enumerate(VALUES):
        trial = study.ask()
        trial.suggest_float("sparsity", 0.0, 0.8)
        trial.suggest_categorical("quantizer", ["none", "int8"])
        trial.set_user_attr("variant", f"v{number}")
        trial.set_user_attr("stages", f"prune(sparsity={number / 10})")
        if number == 1 and artifact_dir is not None:
            path = artifact_dir.parent / "trial-1.json"
            path.write_text(json.dumps(ARTIFACT))
            data = path.read_bytes()
            store = FileSystemArtifactStore(str(artifact_dir))
            artifact_id = upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=trial
            )
            path.unlink()  # the dashboard must serve the stored copy
        study.tell(trial, list(values))
    failed = study.ask()
    failed.set_user_attr("error", "RuntimeError: boom")
    study.tell(failed, state=TrialState.FAIL)
    return artifact_id, data


@pytest.fixture
def sweep(tmp_path: Path) -> Sweep:
    folder = tmp_path / "reports" / "my-sweep"
    (folder / "artifacts").mkdir(parents=True)
    storage = f"sqlite:///{(folder / 'sweep.db').as_posix()}"
    artifact_id, data = _make_study(storage, "my-sweep", folder / "artifacts")
    doc = {"storage": storage, "study_name": "my-sweep", "artifact_dir": "artifacts"}
    (folder / "sweep.json").write_text(json.dumps(doc))
    return Sweep(folder, storage, artifact_id, data)


@pytest.fixture
def plain_run(tmp_path: Path) -> Path:
    folder = tmp_path / "reports" / "int8"
    folder.mkdir(parents=True)
    _make_study(f"sqlite:///{(folder / 'study.db').as_posix()}", "int8", None)
    return folder


# ---------------------------------------------------------------- the server, end to end


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _restore_sigint() -> None:
    # A runner may start tests with SIGINT ignored, which a child inherits; the CLI's Ctrl-C
    # handling is tested with Python's usual SIGINT -> KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    out: Path
    err: Path

    def get(self, route: str) -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        with opener.open(self.base + route, timeout=10) as resp:
            return resp.read()

    def json(self, route: str) -> Any:
        return json.loads(self.get(route))


@contextmanager
def _dashboard(args: list[str], cwd: Path) -> Iterator[Server]:
    """`python -m compress.dashboard ARGS --port P` in `cwd`, once it answers HTTP."""
    if os.name != "posix":
        pytest.skip("the test server is driven with POSIX signals")
    try:
        port = _free_loopback_port()
    except OSError as exc:
        pytest.skip(f"cannot bind a loopback port: {exc}")
    out, err = cwd / f"dashboard-{port}.out", cwd / f"dashboard-{port}.err"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "compress.dashboard", *args]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with out.open("wb") as fout, err.open("wb") as ferr:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=fout, stderr=ferr, preexec_fn=_restore_sigint
        )
    server = Server(proc, f"http://127.0.0.1:{port}", out, err)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                text = err.read_text(errors="replace")
                if "address already in use" in text.lower():
                    pytest.skip(f"port {port} was taken before the dashboard bound it")
                pytest.fail(f"the dashboard exited with {proc.returncode}: {text[-2000:]}")
            try:
                server.get("/api/meta")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail("the dashboard did not answer within 30 s")
                time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _attrs(serialized: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in serialized}


def test_serves_a_sweep_with_its_trials_pareto_front_and_artifacts(
    sweep: Sweep, tmp_path: Path
) -> None:
    rel = sweep.folder.relative_to(tmp_path)  # a relative folder, as users type it
    with _dashboard([str(rel)], cwd=tmp_path) as server:
        assert server.json("/api/meta")["artifact_is_available"] is True
        studies = server.json("/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["my-sweep"]
        study_id = studies[0]["study_id"]
        assert studies[0]["directions"] == ["minimize"] * 3

        detail = server.json(f"/api/studies/{study_id}?after=0")
        assert detail["name"] == "my-sweep"
        assert detail["objective_names"] == METRICS
        trials = detail["trials"]
        assert [t["number"] for t in trials] == [0, 1, 2, 3]
        assert [t["state"] for t in trials] == ["Complete", "Complete", "Complete", "Fail"]
        assert [t["values"] for t in trials[:3]] == [list(v) for v in VALUES]
        assert "values" not in trials[3]
        assert sorted(t["number"] for t in detail["best_trials"]) == [0, 1]  # Pareto front
        assert _attrs(trials[1]["user_attrs"]) == {
            "variant": "v1",
            "stages": "prune(sparsity=0.1)",
        }
        assert _attrs(trials[3]["user_attrs"]) == {"error": "RuntimeError: boom"}
        assert {p["name"] for p in trials[1]["params"]} == {"sparsity", "quantizer"}

        assert [t["artifacts"] for t in trials if t["number"] != 1] == [[], [], []]
        (meta,) = trials[1]["artifacts"]
        assert meta["artifact_id"] == sweep.artifact_id
        assert meta["filename"] == "trial-1.json"
        assert meta["mimetype"] == "application/json"
        route = f"/artifacts/{study_id}/{trials[1]['trial_id']}/{sweep.artifact_id}"
        body = server.get(route)
        assert body == sweep.artifact_bytes and json.loads(body) == ARTIFACT

        server.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.proc.wait(timeout=15) == 130

    lines = server.out.read_text().splitlines()
    assert len(lines) == 1, lines
    port = server.base.rsplit(":", 1)[1]
    assert "study 'my-sweep'" in lines[0] and str(sweep.folder / "artifacts") in lines[0]
    assert f"http://127.0.0.1:{port}/dashboard/" in lines[0]
    assert "Traceback" not in server.err.read_text()


def test_serves_a_plain_run(plain_run: Path, tmp_path: Path) -> None:
    storage, artifact_dir = resolve(plain_run)
    assert storage == f"sqlite:///{(plain_run / 'study.db').resolve().as_posix()}"
    assert artifact_dir is None
    assert resolve(plain_run / "study.db") == (storage, None)
    assert resolve(storage) == (storage, None)

    with _dashboard([str(plain_run)], cwd=tmp_path) as server:
        assert server.json("/api/meta")["artifact_is_available"] is False
        (study,) = server.json("/api/studies")["study_summaries"]
        assert study["study_name"] == "int8"
        detail = server.json(f"/api/studies/{study['study_id']}?after=0")
        assert [t["state"] for t in detail["trials"]] == ["Complete"] * 3 + ["Fail"]
    assert "study 'int8' from sqlite:///" in server.out.read_text()


# ---------------------------------------------------------------- resolving a folder


def test_sweep_json_wins_and_artifact_dir_is_relative_to_the_folder(
    sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (sweep.folder / "study.db").write_bytes(b"")  # ignored: sweep.json comes first
    monkeypatch.chdir(tmp_path)  # not the report folder
    expected = (sweep.storage, (sweep.folder / "artifacts").resolve())
    assert resolve(sweep.folder) == expected
    assert resolve(sweep.folder / "sweep.json") == expected
    assert resolve(str(sweep.folder.relative_to(tmp_path))) == expected

    other = tmp_path / "elsewhere"
    other.mkdir()
    assert resolve(sweep.folder, artifact_dir="elsewhere") == (sweep.storage, other.resolve())
    assert resolve(sweep.folder, storage="sqlite:////x.db")[0] == "sqlite:////x.db"


def test_absent_or_null_artifact_dir_means_no_artifacts(tmp_path: Path) -> None:
    for doc in (
        {"storage": "sqlite:////x.db"},
        {"storage": "sqlite:////x.db", "artifact_dir": None},
    ):
        # signed: a pointer compress wrote here may name an SQLite file anywhere
        (tmp_path / "sweep.json").write_text(json.dumps(sign_pointer(doc)))
        assert resolve(tmp_path) == ("sqlite:////x.db", None)


def test_a_relative_sqlite_path_is_relative_to_the_report_folder(
    sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = {"storage": "sqlite:///sweep.db", "study_name": "my-sweep"}
    (sweep.folder / "sweep.json").write_text(json.dumps(doc))  # unsigned, inside: allowed
    monkeypatch.chdir(tmp_path)
    assert resolve(sweep.folder)[0] == f"sqlite:///{(sweep.folder / 'sweep.db').resolve()}"


def test_recorded_postgres_url_gets_its_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = {"storage": "postgresql+psycopg://me:***@db.example:5432/optuna", "study_name": "s"}
    (tmp_path / "sweep.json").write_text(json.dumps(sign_pointer(doc)))
    # Written by compress here: the masked password is dropped, so libpq falls back to
    # PGPASSWORD / ~/.pgpass, and the dashboard names the host before connecting.
    assert resolve(tmp_path)[0] == "postgresql+psycopg://me@db.example:5432/optuna"
    assert _resolve_source(tmp_path).host == "db.example:5432"
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    url = resolve(tmp_path, storage="postgresql+psycopg://me:$DB_PASSWORD@db.example/optuna")[0]
    assert url == "postgresql+psycopg://me:s3cret@db.example/optuna"
    src = _resolve_source(tmp_path, storage=url)
    assert src.study_name == "s" and src.origin == "--storage"


def test_command_for_quotes_the_folder() -> None:
    assert command_for("reports/int8") == "python -m compress.dashboard reports/int8"
    assert command_for(Path("/r/my run")) == "python -m compress.dashboard '/r/my run'"


# ---------------------------------------------------------------- bad input: one line, exit 2


def _not_optuna_db(path: Path) -> None:
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (a INTEGER)")
    con.commit()
    con.close()


BAD: list[tuple[str, Any, str]] = [
    # (case, how to make the folder's content, expected part of the message)
    ("missing folder", None, "no such report folder"),
    ("empty folder", {}, "no sweep.json (a sweep) or study.db (a run) here"),
    ("sweep.json is a folder", {"sweep.json/": None}, "sweep.json: cannot read"),
    ("invalid JSON", {"sweep.json": "{storage: x"}, "sweep.json: not valid JSON"),
    ("not UTF-8", {"sweep.json": b"\xff\xfe{"}, "sweep.json: not valid JSON"),
    ("JSON list", {"sweep.json": "[]"}, "sweep.json: must be a JSON object, got list"),
    ("no storage", {"sweep.json": '{"study_name": "s"}'}, "sweep.json: storage: must be"),
    ("storage not a URL", {"sweep.json": '{"storage": "x.db"}'}, "not a SQLAlchemy URL"),
    (
        "bad study_name",
        {"sweep.json": '{"storage": "sqlite:///x.db", "study_name": 3}'},
        "sweep.json: study_name: must be",
    ),
    (
        "missing artifact dir",
        {"sweep.json": '{"storage": "sqlite:///x.db", "artifact_dir": "gone"}'},
        "artifact_dir",
    ),
    ("missing SQLite file", {"sweep.json": '{"storage": "sqlite:///{dir}/no.db"}'}, "no such"),
    (
        "not an Optuna database",
        {"sweep.json": '{"storage": "sqlite:///{dir}/other.db"}', "other.db": _not_optuna_db},
        "cannot open: no such table",
    ),
    ("not a database", {"study.db": b"hello, not sqlite"}, "cannot open: file is not a database"),
    ("SQLite file of no study", {"x.db": b"not sqlite either"}, "neither a report folder"),
]


def _populate(folder: Path, content: dict) -> None:
    folder.mkdir(parents=True)
    for name, value in content.items():
        path = folder / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir()
        elif callable(value):
            value(path)
        elif isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(value.replace("{dir}", folder.as_posix()))


def _main_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(("case", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(
    case: str, content: dict | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "reports" / "r"
    if content is not None:
        _populate(folder, content)
    target = folder / "x.db" if case == "SQLite file of no study" else folder
    line = _main_error([str(target)], capsys)
    assert message in line
    with pytest.raises(DashboardError, match=re.escape(message)):
        open_storage(_resolve_source(target))  # the same error for code that calls the API
    if case == "missing SQLite file":
        assert not (folder / "no.db").exists()  # not created as a side effect


def test_unknown_study_name_is_an_error(sweep: Sweep, capsys: pytest.CaptureFixture) -> None:
    doc = json.loads((sweep.folder / "sweep.json").read_text())
    (sweep.folder / "sweep.json").write_text(json.dumps(dict(doc, study_name="other")))
    line = _main_error([str(sweep.folder)], capsys)
    assert "study 'other' is not in" in line and "'my-sweep'" in line


def test_postgres_without_driver(
    sweep: Sweep, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    url = "postgresql+psycopg://me:s3cret@127.0.0.1:1/optuna"
    line = _main_error([str(sweep.folder), "--storage", url], capsys)
    assert "the database driver 'psycopg' is not installed" in line
    assert "compress[postgres]" in line
    assert "s3cret" not in line and "me:***@127.0.0.1" in line


def test_cli_bad_input_has_no_traceback(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "compress.dashboard", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {tmp_path / 'nope'}: no such report folder (nor a storage URL)\n"


# ---------------------------------------------------------------- read-only, a taken port


def test_a_taken_port_is_one_line_and_exit_2_before_anything_else(
    sweep: Sweep, capsys: pytest.CaptureFixture
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        try:
            holder.bind(("127.0.0.1", 0))
        except OSError as exc:
            pytest.skip(f"cannot bind a loopback port: {exc}")
        holder.listen()
        port = holder.getsockname()[1]
        code = main([str(sweep.folder), "--host", "127.0.0.1", "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""  # no "serving at ..." before the failure
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "already in use" in lines[0].lower() and f"--port {port + 1}" in lines[0]


def _request(server: Server, method: str, route: str, body: bytes = b"{}") -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(server.base + route, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_read_only_unless_asked(sweep: Sweep, tmp_path: Path) -> None:
    with _dashboard([str(sweep.folder)], cwd=tmp_path) as server:
        (study,) = server.json("/api/studies")["study_summaries"]
        sid = study["study_id"]
        trial_id = server.json(f"/api/studies/{sid}?after=0")["trials"][1]["trial_id"]
        code, body = _request(
            server, "DELETE", f"/api/artifacts/{sid}/{trial_id}/{sweep.artifact_id}"
        )
        assert code == 403 and "--allow-writes" in body["reason"]
        code, _ = _request(server, "DELETE", f"/api/studies/{sid}")
        assert code == 403
        code, _ = _request(
            server, "PUT", f"/api/studies/{sid}/note", b'{"version": 1, "body": "x"}'
        )
        assert code == 403
        assert server.json("/api/studies")["study_summaries"][0]["study_id"] == sid  # still there
        assert server.get(f"/artifacts/{sid}/{trial_id}/{sweep.artifact_id}")  # still served
    assert "read-only" in server.out.read_text()
    with _dashboard([str(sweep.folder), "--allow-writes"], cwd=tmp_path) as server:
        code, _ = _request(
            server, "PUT", f"/api/studies/{sid}/note", b'{"version": 1, "body": "x"}'
        )
        assert code in (200, 204)
    assert "read-only" not in server.out.read_text()
