"""Entry point: ``python -m compress.dashboard reports/<name>``.

Opens a run's Optuna study in optuna-dashboard (trials, Pareto front, each trial's attached
files) without having to spell out its storage URL or artifact folder:

    python -m compress.dashboard reports/int8                  # http://127.0.0.1:8080/dashboard/
    python -m compress.dashboard reports/my-sweep --port 8081
    python -m compress.dashboard reports/my-sweep --storage "postgresql+psycopg://me:$PW@db/optuna"
    python -m compress.dashboard sqlite:///reports/int8/study.db

The target is a report folder, a file in one, or a storage URL. In a folder, ``sweep.json``
(written by a sweep: ``storage``, ``study_name``, ``artifact_dir``, the latter relative to
the folder) comes first, then ``study.db`` (a plain run, no artifacts). What a report folder
records is data, never trusted as commands: no ``$VARS`` in it are expanded, and the
dashboard connects to a database host it names only when compress wrote that ``sweep.json``
on this machine (its signature checks with this user's key, see
:func:`compress.storage.sign_pointer`); it then prints the host before connecting, and a
password recorded masked (``***``) is dropped, so PostgreSQL falls back to ``PGPASSWORD`` or
``~/.pgpass``. A ``sweep.json`` from anywhere else may only name an SQLite file and an
artifact folder inside its own folder. ``--storage`` (where ``$VARS`` are expanded: it is
the user's own input) replaces the recorded URL altogether.

It binds the address first (a port already taken is one line of error, before anything
else), prints one line saying what it serves and where, then serves optuna-dashboard's own
application in the foreground until Ctrl-C. The dashboard is read-only unless
``--allow-writes`` is given: a request that would change the study or its artifacts (a note,
a deleted trial, an uploaded file: anything but GET and HEAD) is refused with 403, so looking
at results cannot alter them. Exit codes: 2 bad input (the reason on one line of stderr),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import CompressError
from compress.storage import (
    STUDY_FILE,
    SWEEP_FILE,
    mask_url,
    mask_urls,
    pointer_is_signed,
    sqlite_url,
)

if TYPE_CHECKING:
    from optuna.storages import RDBStorage
    from sqlalchemy.engine import URL

SQLITE_HEADER = b"SQLite format 3\x00"
MASKED_PASSWORD = "***"  # what sqlalchemy's render_as_string(hide_password=True) writes
CONNECT_TIMEOUT_S = 10  # a PostgreSQL host that does not answer fails fast, not after minutes


class DashboardError(CompressError):
    """The target cannot be served: no such folder, no study in it, storage unreachable..."""


@dataclass(frozen=True)
class Source:
    """What to serve: a storage URL, an artifact folder, and where they were read from."""

    storage: str
    artifact_dir: Path | None
    study_name: str | None  # the study the target names (a sweep), if any
    origin: str  # e.g. "reports/x/sweep.json", for messages
    pointer: Path | None = None  # the sweep.json the storage and artifacts were read from
    signed: bool = False  # that sweep.json was written by compress on this machine
    host: str | None = None  # a database host recorded in a sweep.json: shown before connecting


def _is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _parse(url: str, origin: str) -> URL:
    if "://" not in url:
        raise DashboardError(f"{origin}: storage: not a SQLAlchemy URL: {mask_urls(url)!r}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError as exc:
        raise DashboardError(f"{origin}: storage: {mask_urls(str(exc))}") from None


def _drop_masked_password(parsed: URL) -> str:
    """The URL without a password recorded masked (libpq then reads PGPASSWORD)."""
    if parsed.password != MASKED_PASSWORD:  # (URL.set(password=None) would keep it)
        return parsed.render_as_string(hide_password=False)
    from sqlalchemy.engine import URL

    bare = URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    )
    return bare.render_as_string(hide_password=False)


def _user_url(url: str, origin: str) -> str:
    """A storage URL the user typed (a target or --storage): $VARS expanded, a masked
    password dropped."""
    url = os.path.expandvars(url.strip())
    parsed = _parse(url, origin)
    return url if parsed.password != MASKED_PASSWORD else _drop_masked_password(parsed)


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _recorded_url(src: Source) -> Source:
    """The storage a sweep.json records, taken literally (no $VARS): an SQLite path is
    relative to the report folder; a database host is only used for a signed pointer."""
    assert src.pointer is not None
    folder = src.pointer.parent
    raw = src.storage.strip()
    parsed = _parse(raw, src.origin)
    shown = mask_url(raw)
    not_ours = f"{src.origin} was not written by compress on this machine (unsigned or changed)"
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db and db != ":memory:" and not db.startswith("file:"):
            path = folder / db  # an absolute `db` stays absolute
            if not src.signed and not _inside(path, folder):
                raise DashboardError(
                    f"{not_ours}: its storage {shown} is outside the report folder; "
                    "pass --storage to open it"
                )
            url = parsed.set(database=str(path.resolve())).render_as_string(hide_password=False)
            return replace(src, storage=raw if Path(db).is_absolute() else url)
        return src
    if not src.signed:
        raise DashboardError(
            f"{not_ours}: not connecting to the database at {parsed.host or 'localhost'} it "
            "names; pass --storage URL to open a study there"
        )
    host = f"{parsed.host or 'localhost'}{f':{parsed.port}' if parsed.port else ''}"
    return replace(src, storage=_drop_masked_password(parsed), host=host)


def _read_sweep(path: Path) -> Source:
    """The storage, study and artifact folder a sweep recorded in `path` (a sweep.json)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DashboardError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DashboardError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DashboardError(f"{path}: must be a JSON object, got {type(doc).__name__}")
    storage = doc.get("storage")
    if not isinstance(storage, str) or not storage.strip():
        raise DashboardError(f"{path}: storage: must be a non-empty SQLAlchemy URL string")
    name = doc.get("study_name")
    if name is not None and (not isinstance(name, str) or not name):
        raise DashboardError(f"{path}: study_name: must be a non-empty string or absent")
    art = doc.get("artifact_dir")
    if art is not None and (not isinstance(art, str) or not art):
        raise DashboardError(f"{path}: artifact_dir: must be a non-empty path string or null")
    art_dir = (path.parent / art).resolve() if art else None  # absolute stays absolute
    return Source(storage, art_dir, name, str(path), path, pointer_is_signed(doc))


def _source(target: str | Path) -> Source:
    """What `target` (a report folder, a file in one, or a storage URL) points at."""
    text = str(target)
    if "://" in text:
        return Source(text, None, None, "the storage URL")
    path = Path(text).expanduser()
    if not path.exists():
        raise DashboardError(f"{path}: no such report folder (nor a storage URL)")
    if path.is_file():
        if path.name == SWEEP_FILE:
            return _read_sweep(path)
        if _is_sqlite_file(path):
            return Source(sqlite_url(path.resolve()), None, None, str(path))
        raise DashboardError(f"{path}: neither a report folder, a {SWEEP_FILE} nor an SQLite file")
    if (path / SWEEP_FILE).exists():
        return _read_sweep(path / SWEEP_FILE)
    if (path / STUDY_FILE).is_file():
        return Source(sqlite_url((path / STUDY_FILE).resolve()), None, None, str(path / STUDY_FILE))
    raise DashboardError(
        f"{path}: no {SWEEP_FILE} (a sweep) or {STUDY_FILE} (a run) here; "
        "is it a report folder written by python -m compress.run?"
    )


def resolve_source(
    target: str | Path, storage: str | None = None, artifact_dir: str | Path | None = None
) -> Source:
    """Like :func:`resolve`, with the study name, origin and recorded host kept."""
    src = _source(target)
    art = src.artifact_dir
    if artifact_dir is not None:
        art = Path(artifact_dir).expanduser().resolve()
        if not art.is_dir():
            raise DashboardError(f"--artifact-dir {art}: no such folder")
    elif art is not None and not art.is_dir():
        raise DashboardError(
            f"{src.origin}: artifact_dir {art}: no such folder (pass --artifact-dir)"
        )
    elif art is not None and src.pointer is not None and not src.signed:
        if not _inside(art, src.pointer.parent):
            raise DashboardError(
                f"{src.origin} was not written by compress on this machine (unsigned or "
                f"changed): its artifact_dir {art} is outside the report folder; "
                "pass --artifact-dir to use it"
            )
    src = replace(src, artifact_dir=art)
    if storage is not None:
        return replace(src, storage=_user_url(storage, "--storage"), origin="--storage", host=None)
    if src.pointer is not None:
        return _recorded_url(src)
    return replace(src, storage=_user_url(src.storage, src.origin))


def resolve(
    target: str | Path, storage: str | None = None, artifact_dir: str | Path | None = None
) -> tuple[str, Path | None]:
    """The storage URL and artifact folder (absolute, or None) to serve for `target`.

    `target` is a report folder (its sweep.json, else its study.db), a sweep.json or SQLite
    file, or a storage URL; `storage` and `artifact_dir` override what it records. Raises
    :class:`DashboardError` for a target that names nothing servable. Opens no storage.
    """
    src = resolve_source(target, storage, artifact_dir)
    return src.storage, src.artifact_dir


def _reason(exc: BaseException) -> str:
    """The innermost cause of `exc` on one line (optuna wraps sqlalchemy wraps the driver)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    orig = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError: the driver's own error
    text = str(orig if orig is not None else exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _missing_module(exc: BaseException | None) -> str | None:
    """The module whose import failed somewhere in `exc`'s chain (optuna wraps it), or None."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


def open_storage(src: Source) -> tuple[RDBStorage, list[str]]:
    """The storage of `src`, opened read-mostly, and the names of the studies in it."""
    from sqlalchemy.engine import make_url

    shown = mask_url(src.storage)
    url = make_url(src.storage)
    engine_kwargs: dict = {}
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if db in ("", ":memory:") or db.startswith("file:"):
            raise DashboardError(f"{src.origin}: {shown}: an in-memory SQLite holds no study")
        if not Path(db).is_file():  # sqlite would create an empty file
            raise DashboardError(f"{src.origin}: {shown}: no such SQLite file")
    elif url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}

    from optuna.storages import RDBStorage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = RDBStorage(src.storage, engine_kwargs=engine_kwargs, skip_table_creation=True)
            names = [s.study_name for s in storage.get_all_studies()]
    except Exception as exc:  # optuna, sqlalchemy and driver errors share no narrower base
        missing = _missing_module(exc)
        if missing is not None:
            hint = " (pip install 'compress[postgres]')" if missing.startswith("psycopg") else ""
            raise DashboardError(
                f"{src.origin}: {shown}: the database driver {missing!r} is not installed{hint}"
            ) from None
        reason = _reason(exc)
        hint = " (set PGPASSWORD or pass --storage)" if "password" in reason.lower() else ""
        raise DashboardError(f"{src.origin}: {shown}: cannot open: {reason}{hint}") from None
    if src.study_name is not None and src.study_name not in names:
        held = ", ".join(repr(n) for n in names) or "no study"
        raise DashboardError(
            f"{src.origin}: study {src.study_name!r} is not in {shown} (it holds {held})"
        )
    return storage, names


def dashboard_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return f"http://{shown}:{port}/dashboard/"


READ_ONLY_REASON = (
    "this dashboard is read-only: start it with --allow-writes to change the study or its artifacts"
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def read_only(app: WsgiApp) -> WsgiApp:
    """`app` refusing every request that could change something (any method but GET, HEAD and
    OPTIONS) with 403 and optuna-dashboard's own error shape, ``{"reason": ...}``, which its
    pages show."""

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() in SAFE_METHODS:
            return app(environ, start_response)
        body = json.dumps({"reason": READ_ONLY_REASON}).encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return guarded


def bind(host: str, port: int, app: WsgiApp) -> Any:
    """A WSGI server for `app` already listening on `host`:`port` (quiet: no line per
    request), or :class:`DashboardError` on one line when the address cannot be had (a port
    another program holds, an address not on this machine)."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
            pass

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        return make_server(host, port, app, server_class=Server, handler_class=Quiet)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = (
            f"; is a dashboard already running there? Pass --port {port + 1} (or another)"
            if exc.errno in (98, 48, 10048)  # EADDRINUSE on Linux, macOS, Windows
            else ""
        )
        raise DashboardError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m compress.dashboard",
        description="Open a run's or a sweep's Optuna study, with its artifacts, "
        "in optuna-dashboard.",
    )
    p.add_argument(
        "target",
        help="report folder (reports/<name>, with sweep.json or study.db) or a storage URL",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--storage",
        help="storage URL to use instead of the recorded one, e.g. with the password: "
        "postgresql+psycopg://user:$PGPASSWORD@host:5432/db",
    )
    p.add_argument(
        "--artifact-dir", type=Path, help="artifact folder to use instead of the recorded one"
    )
    p.add_argument(
        "--allow-writes",
        action="store_true",
        help="let the dashboard change the study: notes, deleting trials, uploading or "
        "deleting artifacts (default: read-only)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port: must be in [0, 65535], got {args.port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        src = resolve_source(args.target, args.storage, args.artifact_dir)
        if src.host is not None:  # a host read from a file: say where before going there
            print(
                f"connecting to {src.host} ({mask_url(src.storage)}, from {src.origin})", flush=True
            )
        storage, names = open_storage(src)
        import optuna
        import optuna_dashboard
        from optuna.artifacts import FileSystemArtifactStore

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        store = FileSystemArtifactStore(str(src.artifact_dir)) if src.artifact_dir else None
        app = optuna_dashboard.wsgi(storage, artifact_store=store)
        server = bind(args.host, args.port, app if args.allow_writes else read_only(app))
        if src.study_name is not None:
            what = f"study {src.study_name!r}"
        elif len(names) == 1:
            what = f"study {names[0]!r}"
        else:
            what = f"{len(names)} studies"
        arts = f" with artifacts in {src.artifact_dir}" if src.artifact_dir else ""
        mode = "" if args.allow_writes else ", read-only"
        port = server.server_port  # the one bound (--port 0: any free one)
        print(
            f"optuna-dashboard: {what} from {mask_url(src.storage)}{arts} "
            f"at {dashboard_url(args.host, port)}  (Ctrl-C to stop{mode})",
            flush=True,
        )
        try:
            server.serve_forever()
        finally:
            server.server_close()
    except CompressError as exc:
        print(f"error: {mask_urls(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 130  # serve_forever only returns when stopped


if __name__ == "__main__":
    sys.exit(main())
