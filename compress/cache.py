"""Content-addressed cache for artifacts that are expensive to rebuild (tokenizers, baselines),
each entry verified by the sha256 of its bytes when it is read back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "COMPRESS_CACHE_DIR"


def cache_dir() -> Path:
    """Root of the cache: ``$COMPRESS_CACHE_DIR`` or ``~/.cache/compress``."""
    root = os.environ.get(ENV_VAR)
    path = Path(root) if root else Path.home() / ".cache" / "compress"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON form of ``obj`` (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Verified entries: every entry carries the sha256 of its bytes, checked when it is read back.
#
# A file entry ``x`` has its digest in ``x.sha256`` beside it; a folder entry (a saved baseline)
# has ``CHECKSUMS.json`` inside it, mapping each file to its digest. Both are written after the
# payload, atomically. An entry whose digest is missing or differs is reported by a one-line
# warning that names it, and the caller rebuilds it; it is never used.

DIGEST_SUFFIX = ".sha256"
CHECKSUMS = "CHECKSUMS.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def digest_path(path: Path) -> Path:
    """Where the digest of the file entry ``path`` is kept."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_entry(path: Path, data: bytes) -> None:
    """A file entry: the payload, then its digest (each written atomically)."""
    write_atomic(path, data)
    write_atomic(digest_path(path), sha256_bytes(data).encode())


def seal_file(path: Path) -> None:
    """Record the digest of the file entry ``path``, already written in full."""
    write_atomic(digest_path(path), sha256_file(path).encode())


def read_entry(path: Path, what: str) -> bytes | None:
    """The bytes of the file entry ``path`` when they match their digest; ``None`` when the
    entry is absent, and ``None`` with a warning naming it when it is unreadable, has no
    digest or does not match it (the caller then rebuilds it)."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        expected = digest_path(path).read_text().strip()
    except FileNotFoundError:
        return _rejected(path, what, "has no checksum")
    except OSError as exc:
        return _rejected(path, what, f"cannot be read ({exc.strerror})")
    if sha256_bytes(data) != expected:
        return _rejected(path, what, "does not match its checksum")
    return data


def seal_dir(path: Path) -> None:
    """Record the digest of every file of the folder entry ``path`` in its ``CHECKSUMS.json``
    (write the folder under a temporary name, seal it, then rename it into place)."""
    sums = {
        f.relative_to(path).as_posix(): sha256_file(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != CHECKSUMS
    }
    write_atomic(path / CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True).encode())


def verify_dir(path: Path, what: str) -> bool:
    """Whether every file the folder entry's ``CHECKSUMS.json`` lists is there and matches;
    when not, a warning names the entry and the first file that fails."""
    problem = _dir_problem(path)
    if problem is not None:
        _rejected(path, what, problem)
    return problem is None


def _dir_problem(path: Path) -> str | None:
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return "has no checksum"
    except (OSError, ValueError) as exc:
        return f"has an unreadable {CHECKSUMS} ({exc})"
    if not isinstance(sums, dict) or not sums:
        return f"has an empty or invalid {CHECKSUMS}"
    for name, expected in sums.items():
        try:
            actual = sha256_file(path / name)
        except OSError:
            return f"lacks its file {name}"
        if actual != expected:
            return f"does not match its checksum ({name})"
    return None


def _rejected(path: Path, what: str, problem: str) -> None:
    log.warning("cache: %s %s %s; rebuilding it", what, path, problem)
    return None
