"""Text corpora with fixed train/valid/test splits.

Two sources:

- :func:`builtin_corpus`: English text that ships with Python itself (the pydoc topic pages and
  the docstrings of the standard library's source files), so it works offline on any machine.
  Split by document, cached as JSON.
- :func:`files_corpus`: plain-text files or glob patterns, either one stream cut contiguously
  into three parts or one list of files per split.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from compress.cache import cache_dir, read_entry, stable_hash, write_entry
from compress.errors import CompressError
from compress.sanity import binary_signs

logger = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "valid", "test")

# Bump when the builtin corpus recipe changes, so stale caches are not reused.
_BUILTIN_FORMAT = 1
# Directory names skipped when walking the standard library (third-party code and test suites).
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """Three splits of text plus where they came from.

    Equality and hashing use ``name``, ``fingerprint`` and ``description`` only (the fingerprint
    already covers the texts), so comparing two corpora is cheap.
    """

    name: str
    train: str = field(repr=False, compare=False)
    valid: str = field(repr=False, compare=False)
    test: str = field(repr=False, compare=False)
    fingerprint: str
    description: str
    stats: dict = field(repr=False, compare=False)
    # one line each: why the text may not be text (see compress.sanity.binary_signs)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def split(self, name: str) -> str:
        """Text of split ``name`` (one of ``train``, ``valid``, ``test``)."""
        if name not in SPLITS:
            raise CompressError(
                f"unknown corpus split {name!r}: allowed values are {', '.join(SPLITS)}"
            )
        return getattr(self, name)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _make_corpus(
    name: str,
    texts: dict[str, str],
    documents: dict[str, int],
    source: str,
    notes: list[str] | None = None,
) -> Corpus:
    """Build a :class:`Corpus`, computing fingerprint, stats and the description line."""
    stats = {s: {"documents": documents[s], "bytes": len(texts[s].encode("utf-8"))} for s in SPLITS}
    fingerprint = stable_hash([_sha256(texts[s]) for s in SPLITS])
    parts = ", ".join(f"{s} {stats[s]['documents']:,} docs {stats[s]['bytes']:,} B" for s in SPLITS)
    return Corpus(
        name=name,
        train=texts["train"],
        valid=texts["valid"],
        test=texts["test"],
        fingerprint=fingerprint,
        description=f"{name}: {source}; {parts}",
        stats=stats,
        notes=tuple(dict.fromkeys(notes or ())),
    )


# --------------------------------------------------------------------------- builtin corpus


def _source_docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings of ``tree`` in source order."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _stdlib_documents(stdlib: Path) -> tuple[dict[str, str], int]:
    """``{relative path: joined docstrings}`` for the stdlib's ``.py`` files, and a skip count."""
    docs: dict[str, str] = {}
    skipped = 0
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for fname in sorted(files):
            if not fname.endswith(".py"):
                continue
            path = Path(root) / fname
            rel = path.relative_to(stdlib).as_posix()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(path.read_bytes(), filename=str(path))
            except (OSError, SyntaxError, ValueError, RecursionError) as exc:
                skipped += 1
                logger.debug("builtin corpus: skipped %s: %s", rel, exc)
                continue
            text = _DOC_SEPARATOR.join(_source_docstrings(tree))
            if text:
                docs[rel] = text
    return docs, skipped


def _builtin_documents() -> tuple[dict[str, str], str]:
    """All documents of the builtin corpus keyed by id, and a one-line source description."""
    from pydoc_data.topics import topics  # data only: a dict of strings

    docs: dict[str, str] = {}
    n_topics = 0
    for name, text in topics.items():
        text = text.strip()
        if text:
            docs[f"topic:{name}"] = text
            n_topics += 1
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src_docs, skipped = _stdlib_documents(stdlib)
    docs.update(src_docs)
    if skipped:
        logger.info("builtin corpus: skipped %d unreadable stdlib files", skipped)
    version = sys.version.split()[0]
    source = (
        f"Python {version} pydoc topics ({n_topics}) and stdlib docstrings ({len(src_docs)} files)"
    )
    return docs, source


def _bucket(doc_id: str) -> str:
    """Split of a document, decided by a stable hash of its id alone."""
    b = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    if b < 90:
        return "train"
    return "valid" if b < 95 else "test"


def _builtin_path() -> Path:
    key = stable_hash([_BUILTIN_FORMAT, sys.version, sysconfig.get_paths()["stdlib"]])
    return cache_dir() / "corpus" / f"builtin-{key}.json"


def builtin_corpus() -> Corpus:
    """Offline English text shipped with Python: pydoc topics plus stdlib docstrings.

    One document per pydoc topic and per stdlib source file (its docstrings joined by blank
    lines). Source files are parsed with :mod:`ast`, never imported. Each document goes wholly
    to one split by a hash of its id (about 90/5/5). Cached under ``cache_dir()/corpus``.
    """
    path = _builtin_path()
    raw = read_entry(path, "cached corpus")
    if raw is not None:
        t0 = time.perf_counter()
        try:
            data = json.loads(raw.decode("utf-8"))
            corpus = _make_corpus("builtin", data["texts"], data["documents"], data["source"])
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("builtin corpus: ignoring unreadable cache %s: %s", path, exc)
        else:
            logger.info(
                "builtin corpus: loaded from %s in %.2fs: %s",
                path,
                time.perf_counter() - t0,
                corpus.description,
            )
            return corpus

    t0 = time.perf_counter()
    docs, source = _builtin_documents()
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc_id in sorted(docs):
        parts[_bucket(doc_id)].append(docs[doc_id])
    texts = {s: _DOC_SEPARATOR.join(parts[s]) for s in SPLITS}
    documents = {s: len(parts[s]) for s in SPLITS}
    corpus = _make_corpus("builtin", texts, documents, source)

    payload = {
        "format": _BUILTIN_FORMAT,
        "texts": texts,
        "documents": documents,
        "source": source,
    }
    write_entry(path, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    logger.info(
        "builtin corpus: built in %.2fs, cached at %s: %s",
        time.perf_counter() - t0,
        path,
        corpus.description,
    )
    return corpus


# --------------------------------------------------------------------------- files corpus


def _resolve(pattern: str, base: Path) -> list[Path]:
    """Files matched by ``pattern`` (``~`` expanded, relative to ``base``, ``**`` recursive)."""
    if not isinstance(pattern, str) or not pattern:
        raise CompressError(f"file pattern must be a non-empty string, got {pattern!r}")
    expanded = os.path.expanduser(pattern)
    full = expanded if os.path.isabs(expanded) else os.path.join(base, expanded)
    matches = [Path(p) for p in glob.glob(full, recursive=True)]
    found = sorted(p for p in matches if p.is_file())
    if not found:
        what = "only directories" if matches else "no files"
        raise CompressError(
            f"file pattern {pattern!r} matches {what} (resolved against {base}); "
            "give files or glob patterns of files (`**` matches subdirectories)"
        )
    return found


def _collect(patterns: list[str], base: Path, where: str) -> list[Path]:
    """Sorted, deduplicated files matched by any of ``patterns``."""
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise CompressError(f"{where}: expected a list of file patterns, got {patterns!r}")
    if not patterns:
        raise CompressError(f"{where}: the list of file patterns is empty")
    files: dict[Path, Path] = {}
    for pattern in patterns:
        for path in _resolve(pattern, base):
            files.setdefault(path.resolve(), path)
    return [files[k] for k in sorted(files)]


def _read(path: Path, notes: list[str]) -> str:
    """The text of ``path``; a note (and a warning) when its bytes look binary."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompressError(f"cannot read corpus file {path}: {exc}") from exc
    if (signs := binary_signs(data)) and not any(str(path) in n for n in notes):
        notes.append(_binary_note(f"corpus file {path}", signs))
    return data.decode("utf-8", errors="replace")


def _binary_note(what: str, signs: str) -> str:
    note = f"{what} looks binary, not text ({signs}); a model trained or scored on it means little"
    logger.warning("%s", note)
    return note


def _concat(texts: list[str]) -> tuple[str, list[int]]:
    """Concatenate texts (a newline between two only where the first lacks one) and return the
    start offset of each."""
    out: list[str] = []
    starts: list[int] = []
    pos = 0
    last_newline = True
    for text in texts:
        if pos and not last_newline:
            out.append("\n")
            pos += 1
        starts.append(pos)
        out.append(text)
        pos += len(text)
        if text:
            last_newline = text.endswith("\n")
    return "".join(out), starts


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise CompressError(
            f"fractions must be three positive numbers summing to 1, got {fractions!r}"
        ) from exc
    if (
        len(values) != 3
        or any(isinstance(f, bool) for f in fractions)
        or not all(math.isfinite(v) and v > 0 for v in values)
        or abs(sum(values) - 1.0) > 1e-6
    ):
        raise CompressError(
            f"fractions must be three positive numbers (train, valid, test) summing to 1, "
            f"got {fractions!r}"
        )
    return values  # type: ignore[return-value]


def _cut(text: str, at: int) -> int:
    """Index just after the first newline at or after ``at`` (``len(text)`` if none)."""
    i = text.find("\n", at)
    return len(text) if i < 0 else i + 1


def _describe_files(files: list[Path], base: Path) -> str:
    names = []
    for f in files[:3]:
        try:
            names.append(f.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            names.append(str(f))
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return f"{', '.join(names)}{more} ({len(files)} file{'s' if len(files) != 1 else ''})"


def files_corpus(
    files: list[str] | dict[str, list[str]],
    base_dir: Path | None = None,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> Corpus:
    """A plain-text corpus from files or glob patterns.

    ``files`` is either a list of patterns, whose matched files (sorted, deduplicated) are
    concatenated and cut contiguously into train/valid/test by ``fractions`` of the characters
    (each cut moved forward to just after a newline so lines stay whole), or a dict giving the
    patterns of each split (``train``, ``valid`` and ``test`` all required). Relative patterns
    are resolved against ``base_dir`` (default: the current directory). Files are read as UTF-8;
    undecodable bytes become U+FFFD. In the list form a split's document count is the number of
    files that overlap it.
    """
    base = Path(base_dir).expanduser() if base_dir is not None else Path.cwd()

    if isinstance(files, dict):
        unknown = sorted(str(k) for k in files if k not in SPLITS)
        if unknown:
            raise CompressError(
                f"files corpus: unknown split key(s) {', '.join(unknown)}: "
                f"allowed keys are {', '.join(SPLITS)}"
            )
        missing = [s for s in SPLITS if s not in files]
        if missing:
            raise CompressError(
                f"files corpus: missing split key(s) {', '.join(missing)}: "
                f"all of {', '.join(SPLITS)} are required"
            )
        texts: dict[str, str] = {}
        documents: dict[str, int] = {}
        sources = []
        notes: list[str] = []
        for s in SPLITS:
            paths = _collect(files[s], base, f"files corpus split {s!r}")
            texts[s], _ = _concat([_read(p, notes) for p in paths])
            documents[s] = len(paths)
            sources.append(f"{s} from {_describe_files(paths, base)}")
        for s in SPLITS:
            if not texts[s]:
                raise CompressError(f"files corpus: split {s!r} is empty (its files hold no text)")
        return _make_corpus("files", texts, documents, "; ".join(sources), notes)

    fr = _check_fractions(fractions)
    paths = _collect(files, base, "files corpus")
    notes = []
    text, starts = _concat([_read(p, notes) for p in paths])
    n = len(text)
    c1 = _cut(text, round(n * fr[0]))
    c2 = max(c1, _cut(text, round(n * (fr[0] + fr[1]))))
    bounds = {"train": (0, c1), "valid": (c1, c2), "test": (c2, n)}
    texts = {s: text[a:b] for s, (a, b) in bounds.items()}
    for s in SPLITS:
        if not texts[s]:
            raise CompressError(
                f"files corpus: {_describe_files(paths, base)} hold {n:,} characters, too few "
                f"to cut into train/valid/test with fractions {fractions!r} "
                f"(split {s!r} would be empty; cuts fall after newlines)"
            )
    ends = starts[1:] + [n]
    documents = {
        s: sum(1 for st, en in zip(starts, ends, strict=True) if st < b and en > a)
        for s, (a, b) in bounds.items()
    }
    source = f"{_describe_files(paths, base)} cut {fr[0]:g}/{fr[1]:g}/{fr[2]:g}"
    return _make_corpus("files", texts, documents, source, notes)


# --------------------------------------------------------------------------- datasets corpus


def hf_corpus(
    path: str,
    name: str | None = None,
    text_field: str = "text",
    splits: dict[str, str] | None = None,
) -> Corpus:
    """A corpus from the Hugging Face ``datasets`` library (``load_dataset(path, name)``), its
    splits as the dataset defines them (``splits`` maps train/valid/test to the dataset's split
    names), each split's ``text_field`` rows joined by blank lines as the Hugging Face
    perplexity guide does. Needs a network unless the dataset is in the local datasets cache.
    """
    splits = splits or {"train": "train", "valid": "validation", "test": "test"}
    try:
        import datasets
    except ModuleNotFoundError:
        raise CompressError(
            "data.corpus 'hf' needs the datasets library: pip install 'compress[hf]'"
        ) from None
    try:
        ds = datasets.load_dataset(path, name)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(
            f"data: cannot load dataset {path!r}{f' ({name})' if name else ''}: {first}"
        ) from None
    texts: dict[str, str] = {}
    documents: dict[str, int] = {}
    notes: list[str] = []
    for s in SPLITS:
        split = splits.get(s)
        if split not in ds:
            raise CompressError(
                f"data.splits.{s}: dataset {path!r} has no split {split!r}; it has {', '.join(ds)}"
            )
        if text_field not in ds[split].column_names:
            raise CompressError(
                f"data.text_field: split {split!r} has no column {text_field!r}; it has "
                f"{', '.join(ds[split].column_names)}"
            )
        rows = ds[split][text_field]
        texts[s] = _DOC_SEPARATOR.join(rows)
        documents[s] = len(rows)
        if not texts[s].strip():
            raise CompressError(f"data: split {split!r} of {path!r} holds no text")
        if signs := binary_signs(texts[s]):
            notes.append(_binary_note(f"split {split!r} of dataset {path!r}", signs))
    source = f"datasets {path}{f'/{name}' if name else ''} ({', '.join(splits[s] for s in SPLITS)})"
    return _make_corpus("hf", texts, documents, source, notes)
