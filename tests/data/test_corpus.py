from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from compress.data import Corpus, builtin_corpus, files_corpus
from compress.data import corpus as corpus_mod
from compress.errors import CompressError
from tests.conftest import require_shared


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builtin-cache")


@pytest.fixture(scope="module")
def builtin(builtin_cache: Path) -> Iterator[Corpus]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESS_CACHE_DIR", str(builtin_cache))
        corpus = builtin_corpus()
    yield corpus


# --------------------------------------------------------------------------- builtin corpus


def test_builtin_sizes_and_stats(builtin: Corpus) -> None:
    assert builtin.name == "builtin"
    minimum = {"train": 1_000_000, "valid": 20_000, "test": 20_000}
    for split, low in minimum.items():
        text = builtin.split(split)
        assert builtin.stats[split]["bytes"] == len(text.encode("utf-8"))
        assert builtin.stats[split]["bytes"] > low, split
        assert builtin.stats[split]["documents"] >= 10, split
    docs = {s: builtin.stats[s]["documents"] for s in ("train", "valid", "test")}
    # Roughly 90/5/5 by document.
    total = sum(docs.values())
    assert 0.8 < docs["train"] / total < 0.97
    assert "pydoc topics" in builtin.description and "train" in builtin.description
    # Real English prose from the pydoc topics and stdlib docstrings.
    assert "the" in builtin.train and "Return" in builtin.train


def test_builtin_is_deterministic_and_cached(
    builtin: Corpus, builtin_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(builtin_cache))
    cached = list((builtin_cache / "corpus").glob("builtin-*.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns

    def no_rebuild() -> None:
        raise AssertionError("builtin corpus was rebuilt instead of loaded from the cache")

    monkeypatch.setattr(corpus_mod, "_builtin_documents", no_rebuild)
    again = builtin_corpus()
    assert again == builtin
    assert again.fingerprint == builtin.fingerprint
    assert again.train == builtin.train and again.test == builtin.test
    assert cached[0].stat().st_mtime_ns == mtime


def test_builtin_rebuild_is_identical_and_splits_by_document(
    builtin: Corpus, _cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The autouse fixture points at an empty cache: this is a real second build.
    assert not (_cache / "corpus").exists()
    captured: list[tuple[dict[str, str], str]] = []
    real = corpus_mod._builtin_documents

    def spy() -> tuple[dict[str, str], str]:
        captured.append(real())
        return captured[-1]

    monkeypatch.setattr(corpus_mod, "_builtin_documents", spy)
    fresh = builtin_corpus()
    assert len(captured) == 1
    assert fresh.fingerprint == builtin.fingerprint
    assert fresh.valid == builtin.valid

    # Each split is exactly the documents whose id hashes into it: no document is cut or shared.
    docs, _ = captured[0]
    seen: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for doc_id in sorted(docs):
        seen[corpus_mod._bucket(doc_id)].append(docs[doc_id])
    for split, texts in seen.items():
        assert builtin.split(split) == "\n\n".join(texts)
        assert builtin.stats[split]["documents"] == len(texts)
    assert sum(len(t) for t in seen.values()) == len(docs)
    # Stdlib sources are parsed, not imported; test suites and site-packages are skipped.
    assert not any(i.startswith(("test/", "site-packages/")) for i in docs)
    assert not any("/tests/" in i or "idle_test" in i for i in docs)
    assert any(i.startswith("topic:") for i in docs) and "os.py" in docs
    assert all(text.strip() for text in docs.values())


def test_bucket_depends_on_id_only() -> None:
    assert corpus_mod._bucket("topic:if") == corpus_mod._bucket("topic:if")
    counts = {"train": 0, "valid": 0, "test": 0}
    for i in range(2000):
        counts[corpus_mod._bucket(f"doc{i}")] += 1
    assert 1700 < counts["train"] < 1900
    assert 50 < counts["valid"] < 150 and 50 < counts["test"] < 150


def test_fingerprint_depends_on_text_only() -> None:
    texts = {"train": "a\n", "valid": "b\n", "test": "c\n"}
    one = corpus_mod._make_corpus("x", texts, {"train": 1, "valid": 1, "test": 1}, "s")
    two = corpus_mod._make_corpus("y", dict(texts), {"train": 2, "valid": 2, "test": 2}, "t")
    other = corpus_mod._make_corpus(
        "x", {**texts, "test": "d\n"}, {"train": 1, "valid": 1, "test": 1}, "s"
    )
    assert one.fingerprint == two.fingerprint
    assert one.fingerprint != other.fingerprint
    digests = [hashlib.sha256(texts[s].encode()).hexdigest() for s in ("train", "valid", "test")]
    from compress.cache import stable_hash

    assert one.fingerprint == stable_hash(digests)


def test_split_rejects_unknown_name(builtin: Corpus) -> None:
    with pytest.raises(CompressError, match="allowed values are train, valid, test"):
        builtin.split("validation")


# --------------------------------------------------------------------------- files corpus


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_files_list_is_split_contiguously(tmp_path: Path) -> None:
    a = "".join(f"alpha line {i}\n" for i in range(60))
    b = "".join(f"beta line {i}\n" for i in range(40))
    _write(tmp_path / "b.txt", b)
    _write(tmp_path / "a.txt", a)
    corpus = files_corpus(["*.txt", "a.txt"], base_dir=tmp_path, fractions=(0.8, 0.1, 0.1))
    assert corpus.name == "files"
    # Sorted, deduplicated files concatenated; cuts fall after newlines.
    assert corpus.train + corpus.valid + corpus.test == a + b
    for split in ("train", "valid", "test"):
        assert corpus.split(split).endswith("\n")
        assert corpus.split(split).strip()
    total = len(a + b)
    assert abs(len(corpus.train) - 0.8 * total) < 20
    assert abs(len(corpus.valid) - 0.1 * total) < 40
    assert corpus.stats["train"]["documents"] == 2  # a.txt, then the start of b.txt
    assert corpus.stats["test"]["documents"] == 1
    assert corpus.stats["test"]["bytes"] == len(corpus.test.encode())


def test_files_list_recursive_glob_and_missing_newline(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "x" / "one.txt", "one\n" * 50)
    _write(tmp_path / "d" / "two.txt", "two\n" * 49 + "two")  # no trailing newline
    _write(tmp_path / "d" / "z.txt", "zzz\n" * 50)
    corpus = files_corpus(["d/**/*.txt"], base_dir=tmp_path)
    joined = corpus.train + corpus.valid + corpus.test
    assert joined == "two\n" * 49 + "two\n" + "one\n" * 50 + "zzz\n" * 50  # d/two < d/x < d/z
    assert "twoone" not in joined


def test_files_undecodable_bytes_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\n" * 100)
    corpus = files_corpus(["bad.txt"], base_dir=tmp_path)
    assert "caf\ufffd ok\n" in corpus.train


def test_files_dict_form(tmp_path: Path) -> None:
    _write(tmp_path / "tr1.txt", "train one\n")
    _write(tmp_path / "tr2.txt", "train two\n")
    _write(tmp_path / "va.txt", "valid\n")
    _write(tmp_path / "te.txt", "test\n")
    corpus = files_corpus(
        {"train": ["tr*.txt"], "valid": ["va.txt"], "test": [str(tmp_path / "te.txt")]},
        base_dir=tmp_path,
    )
    assert corpus.train == "train one\ntrain two\n"
    assert corpus.valid == "valid\n" and corpus.test == "test\n"
    assert corpus.stats["train"] == {"documents": 2, "bytes": len("train one\ntrain two\n")}


def test_files_dict_form_errors(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "a\n")
    with pytest.raises(CompressError, match="unknown split key.*validation.*train, valid, test"):
        files_corpus(
            {"train": ["a.txt"], "validation": ["a.txt"], "test": ["a.txt"]}, base_dir=tmp_path
        )
    with pytest.raises(CompressError, match="missing split key.*test"):
        files_corpus({"train": ["a.txt"], "valid": ["a.txt"]}, base_dir=tmp_path)
    with pytest.raises(CompressError, match="nope/\\*.txt"):
        files_corpus(
            {"train": ["a.txt"], "valid": ["a.txt"], "test": ["nope/*.txt"]}, base_dir=tmp_path
        )


def test_files_pattern_matching_nothing_names_pattern_and_dir(tmp_path: Path) -> None:
    with pytest.raises(CompressError) as err:
        files_corpus(["missing/**/*.txt"], base_dir=tmp_path)
    assert "missing/**/*.txt" in str(err.value)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "adir").mkdir()
    with pytest.raises(CompressError, match="only directories"):
        files_corpus(["adir"], base_dir=tmp_path)


@pytest.mark.parametrize(
    "fractions",
    [(0.9, 0.1, 0.0), (0.5, 0.3, 0.3), (0.9, 0.1), (1.2, -0.1, -0.1), ("a", "b", "c")],
)
def test_files_bad_fractions(tmp_path: Path, fractions: tuple) -> None:
    _write(tmp_path / "a.txt", "line\n" * 100)
    with pytest.raises(CompressError, match="fractions must be three positive numbers"):
        files_corpus(["a.txt"], base_dir=tmp_path, fractions=fractions)


def test_files_too_short_to_split(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "only one line\n")
    with pytest.raises(CompressError, match="too few"):
        files_corpus(["a.txt"], base_dir=tmp_path)


def test_files_home_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path / "h.txt", "home line\n" * 40)
    corpus = files_corpus(["~/h.txt"], base_dir=tmp_path / "elsewhere")
    assert corpus.train + corpus.valid + corpus.test == "home line\n" * 40


def test_files_tiny_shakespeare() -> None:
    path = require_shared("tinyshakespeare/input.txt")
    corpus = files_corpus([str(path)])
    raw = path.read_bytes().decode("utf-8")
    assert corpus.train + corpus.valid + corpus.test == raw
    total = sum(corpus.stats[s]["bytes"] for s in ("train", "valid", "test"))
    assert total == path.stat().st_size
    assert 0.89 < corpus.stats["train"]["bytes"] / total < 0.91
    assert corpus.valid.startswith(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"))
    assert corpus.fingerprint == files_corpus([str(path)]).fingerprint


def test_files_wikitext_dict_form() -> None:
    valid = require_shared("wikitext-2/wiki.valid.tokens")
    test = require_shared("wikitext-2/wiki.test.tokens")
    corpus = files_corpus(
        {
            "train": ["wiki.valid.tokens"],
            "valid": ["wiki.test.tokens"],
            "test": ["wiki.test.tokens"],
        },
        base_dir=valid.parent,
    )
    assert corpus.stats["train"]["bytes"] == valid.stat().st_size
    assert corpus.stats["valid"]["bytes"] == test.stat().st_size
    assert "<unk>" in corpus.train
