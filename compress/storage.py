"""Where a run's Optuna study lives: the files of a report folder, storage URLs, and the
command that opens them in the dashboard. Shared by the writers (`compress.report`,
`compress.sweep`) and the reader (`compress.dashboard`), so both name the same files.

Secrets: a storage URL's password is shown and stored only masked (:func:`mask_url`,
:func:`mask_urls`); it reaches local sweep workers through their environment
(:data:`STORAGE_ENV`), never their command line; and a ``sweep.json`` carries an HMAC made
with a key only this user can read (:func:`sign_pointer`), so the dashboard can tell a
pointer compress wrote on this machine from one found in someone else's folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shlex
from pathlib import Path
from typing import Any

STUDY_FILE = "study.db"  # a plain run's study (SQLite)
SWEEP_FILE = "sweep.json"  # a sweep's pointer to its storage, study name and artifacts
STORAGE_ENV = "COMPRESS_STORAGE_URL"  # the full storage URL, handed to local sweep workers
POINTER_KEY_FILE = "pointer.key"  # in the cache folder, mode 0600: signs sweep.json files
SIGNATURE = "signature"  # the key of a sweep.json's HMAC
ARTIFACT_DIR = "artifacts"  # each trial's own report, attached to its Optuna trial


def sqlite_url(db_path: str | Path) -> str:
    """The SQLAlchemy URL of an SQLite file; a relative path stays relative."""
    return f"sqlite:///{Path(db_path).as_posix()}"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


# scheme://user:password@ -> scheme://user:***@ ; a $VAR reference is not a secret and stays
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#\"'<>]*:)(?P<password>[^\s@/\"'<>]+)(?=@)"
)
_VAR_REF = re.compile(r"\$(\w+|\{\w+\})")


def mask_urls(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***, for any text that is
    shown or stored (report pages, JSON and CSV files, error messages)."""

    def mask(m: re.Match[str]) -> str:
        pw = m.group("password")
        return m.group(0) if _VAR_REF.fullmatch(pw) else f"{m.group('head')}***"

    return _URL_PASSWORD.sub(mask, text)


def absolute_sqlite(url: str, base: str | Path | None = None) -> str:
    """`url` with a relative SQLite path made absolute (relative to `base`, default the
    current directory), so the URL means the same file wherever it is read back."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    rest = url[len(prefix) :]
    db, sep, query = rest.partition("?")
    if not db or db == ":memory:" or db.startswith("/"):
        return url
    path = (Path(base) if base is not None else Path.cwd()) / db
    return f"{prefix}{path.resolve().as_posix()}{sep}{query}"


def _key_path() -> Path:
    from compress.cache import cache_dir

    return cache_dir() / POINTER_KEY_FILE


def _pointer_key(create: bool) -> bytes | None:
    """This user's pointer-signing key (32 random bytes, mode 0600), created on first use
    when `create`; None when there is none (then nothing verifies)."""
    path = _key_path()
    try:
        key = path.read_bytes()
        return key if len(key) == 32 else None
    except FileNotFoundError:
        if not create:
            return None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and the first of two racing writers wins
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    return key if len(key) == 32 else None


def _digest(key: bytes, doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != SIGNATURE}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def sign_pointer(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (a sweep.json's content) with an HMAC-SHA256 of its other keys under this
    user's key, so that :func:`pointer_is_signed` can later tell it was written here."""
    key = _pointer_key(create=True)
    assert key is not None
    return {**doc, SIGNATURE: _digest(key, doc)}


def pointer_is_signed(doc: dict[str, Any]) -> bool:
    """Whether `doc` carries a valid signature made with this user's key (unchanged since
    compress wrote it on this machine)."""
    sig = doc.get(SIGNATURE)
    key = _pointer_key(create=False)
    if not isinstance(sig, str) or key is None:
        return False
    return hmac.compare_digest(sig, _digest(key, doc))


def command_for(report_dir: str | Path) -> str:
    """The shell one-liner that opens the run in `report_dir` in optuna-dashboard."""
    return f"python -m compress.dashboard {shlex.quote(str(report_dir))}"
