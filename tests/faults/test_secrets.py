"""Secrets under faults: a crafted report folder must not make the dashboard send anything to
the host it names; a storage password never reaches a worker's command line, a report file
or an error line; a rejected sweep leaves the report folder it was pointed at alone."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import yaml

from compress import run as run_mod
from compress.dashboard import main as dashboard_main
from compress.report import write_report
from compress.report.folder import claim
from compress.storage import STORAGE_ENV, sign_pointer
from compress.sweep import runner
from compress.sweep import study as study_mod
from compress.sweep.driver import write_pointer
from tests.sweep.conftest import sweep_recipe

PGPASSWORD = "pg-env-s3cret"
SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class FakePostgres:
    """A loopback listener that speaks just enough of the PostgreSQL protocol to ask a client
    for its password in clear text and record what it sends."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.startups: list[bytes] = []
        self.passwords: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakePostgres:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                try:
                    self._talk(conn)
                except (OSError, struct.error):
                    pass

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        while True:
            (n,) = struct.unpack("!I", self._read(conn, 4))
            body = self._read(conn, n - 4)
            if struct.unpack("!I", body[:4])[0] in (SSL_REQUEST, GSSENC_REQUEST):
                conn.sendall(b"N")  # no encryption: go on in clear text
                continue
            self.startups.append(body)
            break
        conn.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        if self._read(conn, 1) == b"p":
            (n,) = struct.unpack("!I", self._read(conn, 4))
            self.passwords.append(self._read(conn, n - 4).rstrip(b"\0").decode())
        error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(b"E" + struct.pack("!I", len(error) + 4) + error)


def _crafted(folder: Path, port: int, signed: bool) -> Path:
    folder.mkdir(parents=True)
    doc = {
        "storage": f"postgresql+psycopg://$USER:***@127.0.0.1:{port}/$HOME",
        "study_name": "s",
        "artifact_dir": None,
    }
    (folder / "sweep.json").write_text(json.dumps(sign_pointer(doc) if signed else doc))
    return folder


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", PGPASSWORD)
    monkeypatch.setenv("HOME", "/home/victim")
    monkeypatch.setenv("USER", "victim")
    monkeypatch.delenv("PGPASSFILE", raising=False)


def test_the_dashboard_does_not_connect_where_a_crafted_folder_says(
    tmp_path: Path, secrets_in_env: None, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("psycopg")
    with FakePostgres() as server:
        folder = _crafted(tmp_path / "theirs", server.port, signed=False)
        assert dashboard_main([str(folder), "--port", "0"]) == 2
        # a signed pointer someone changed is not ours either
        doc = sign_pointer({"storage": "sqlite:////x.db", "study_name": "s"})
        doc["storage"] = f"postgresql+psycopg://u:***@127.0.0.1:{server.port}/db"
        (tmp_path / "changed").mkdir()
        (tmp_path / "changed" / "sweep.json").write_text(json.dumps(doc))
        assert dashboard_main([str(tmp_path / "changed"), "--port", "0"]) == 2
    assert server.connections == 0 and server.passwords == []
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "was not written by compress on this machine" in line
        assert "not connecting to the database at 127.0.0.1" in line
        assert PGPASSWORD not in line and "victim" not in line


def test_the_harness_sees_a_connection_to_a_pointer_compress_wrote(
    tmp_path: Path, secrets_in_env: None, capsys: pytest.CaptureFixture
) -> None:
    """The control: a signed pointer is the user's own, and the listener does see the
    dashboard connect to it, after the host was shown, with no $VARS expanded."""
    pytest.importorskip("psycopg")
    with FakePostgres() as server:
        folder = _crafted(tmp_path / "mine", server.port, signed=True)
        assert dashboard_main([str(folder), "--port", "0"]) == 2  # the fake refuses the login
    captured = capsys.readouterr()
    assert captured.out.startswith(f"connecting to 127.0.0.1:{server.port} (")
    assert "password authentication failed" in captured.err
    assert server.connections >= 1
    startup = server.startups[0].split(b"\0")
    assert startup[startup.index(b"database") + 1] == b"$HOME"  # taken literally
    assert startup[startup.index(b"user") + 1] == b"$USER"
    assert server.passwords == [PGPASSWORD]  # what libpq sends where it connects


def test_local_workers_get_the_storage_password_in_their_environment_not_argv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []

    class FakeProcess:
        def __init__(self, argv: list[str], env: dict[str, str] | None = None, **kw) -> None:
            seen.append((argv, env or {}))

            self.pid, self.returncode, self.stderr = 4242, 0, None

        def poll(self) -> int:
            return 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    url = "postgresql+psycopg://me:s3cret-pw@db.example:5432/optuna"
    args = [runner.WorkerArgs("r.yaml", "out", url, "s", i, 2, 1, 2, False, False) for i in (0, 1)]
    assert [e.code for e in runner.spawn_workers(args, print)] == [0, 0]
    assert len(seen) == 2
    for (argv, env), sent in zip(seen, args, strict=True):
        assert argv[:3] == [sys.executable, "-m", "compress.sweep.runner"]
        assert not any("s3cret" in part for part in argv)
        assert (
            json.loads(argv[-1])["storage"] == "postgresql+psycopg://me:***@db.example:5432/optuna"
        )
        assert env[STORAGE_ENV] == url
        assert runner.worker_args(argv[-1], env) == sent  # what the worker gets back, whole
    # a stale variable for another storage is not used
    other = {STORAGE_ENV: "postgresql+psycopg://me:x@elsewhere/optuna"}
    shown = runner.worker_args(seen[0][0][-1], other).storage
    assert shown == "postgresql+psycopg://me:***@db.example:5432/optuna"


def test_a_password_in_the_recipe_or_an_error_reaches_no_report_file(tmp_path: Path) -> None:
    url = "postgresql+psycopg://me:s3cret-pw@db.example:5432/optuna"
    rows = [
        {"variant": "baseline", "status": "ok", "perplexity": 9.0, "latency_ms": 1.0},
        {"variant": "v", "status": "failed", "error": f"OperationalError: cannot reach {url}"},
    ]
    rows[0]["weight_bytes"] = 100
    recipe = sweep_recipe()
    recipe["sweep"]["storage"] = url
    out = tmp_path / "r"
    write_report(
        out,
        rows,
        name="r",
        recipe_text=yaml.safe_dump(recipe),
        meta={"storage": url},
        definitions={},
        environment={},
    )
    for path in out.iterdir():
        data = path.read_bytes()
        assert b"s3cret" not in data, path.name
    assert "me:***@db.example" in (out / "report.html").read_text()
    assert "me:***@db.example" in (out / "results.json").read_text()
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{out / 'study.db'}")
    assert study.trials[1].user_attrs["error"].endswith("me:***@db.example:5432/optuna")


def test_a_rejected_sweep_leaves_the_report_folder_it_was_pointed_at_alone(
    tmp_path: Path, tiny_workspace, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # another sweep's folder, its study created with another search space
    theirs = tmp_path / "reports" / "theirs"
    with claim(theirs, "sweep") as folder:
        folder.ensure()
    storage = f"sqlite:///{theirs / 'sweep.db'}"
    study = optuna.create_study(study_name="tiny-sweep", storage=storage, directions=["minimize"])
    study.set_user_attr(study_mod.STUDY_ATTR, {"space_hash": "another space"})
    write_pointer(theirs, storage, "tiny-sweep")
    before = {p.name: p.read_bytes() for p in theirs.iterdir() if p.name != "sweep.db"}

    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump(sweep_recipe()))
    monkeypatch.chdir(tmp_path / "reports")  # a relative path, as in the report
    code = run_mod.main([str(recipe), "--report-dir", "theirs", "--no-progress"])
    assert code == 2
    assert "was created with a different" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in theirs.iterdir() if p.name != "sweep.db"} == before
    assert optuna.load_study(study_name="tiny-sweep", storage=storage).trials == []
