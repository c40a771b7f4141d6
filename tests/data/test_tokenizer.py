from __future__ import annotations

import math
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from compress.data import (
    Corpus,
    Tokenizer,
    encode_splits,
    files_corpus,
    train_tokenizer,
    unigram_perplexity,
)
from compress.data import tokenizer as tok_mod
from compress.errors import CompressError

VOCAB = 512

TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF\n",
    "naïve café – “quotes” — Straße, Ærø, 東京, привет",
    "emoji 🎉👩‍👩‍👧 and flags 🇫🇷, math ∑∫√, zero\u200bwidth",
    "special <|endoftext|> in text, and <|endoftext|>",
    "\x00\x01 control \x7f bytes and \ufffd replacement",
]


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache))
    return cache


def _sample_text(n_topics: int) -> str:
    return "\n\n".join(topics[k].strip() for k in sorted(topics)[:n_topics]) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    (root / "docs.txt").write_text(_sample_text(40), encoding="utf-8")
    return root


@pytest.fixture
def corpus(corpus_dir: Path) -> Corpus:
    # About 150 kB of English prose from the pydoc topics.
    return files_corpus(["docs.txt"], base_dir=corpus_dir, fractions=(0.8, 0.1, 0.1))


@pytest.fixture
def tok(corpus: Corpus) -> Tokenizer:
    return train_tokenizer(corpus, VOCAB)


def test_basic_properties(tok: Tokenizer, corpus: Corpus) -> None:
    assert tok.vocab_size == VOCAB
    assert tok.backend.id_to_token(tok.eos_id) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    # BPE learned merges: English text takes far fewer tokens than bytes.
    ids = tok.encode(corpus.valid)
    assert len(ids) < 0.5 * len(corpus.valid.encode())
    assert max(ids) < tok.vocab_size


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_every_byte_is_encodable(tok: Tokenizer) -> None:
    text = bytes(range(256)).decode("latin-1") + "".join(chr(c) for c in range(0x2000, 0x2100))
    assert tok.decode(tok.encode(text)) == text


def test_deterministic_across_fresh_caches(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = []
    for name in ("c1", "c2"):
        monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / name))
        t = train_tokenizer(corpus, VOCAB)
        path = tok_mod.tokenizer_cache_path(corpus, VOCAB)
        assert path.is_file() and str(path).startswith(str(tmp_path / name))
        results.append((t.fingerprint, t.encode(corpus.test), path.read_bytes()))
    assert results[0] == results[1]


def test_depends_on_train_split_and_vocab(corpus: Corpus, tok: Tokenizer) -> None:
    bigger = train_tokenizer(corpus, VOCAB + 64)
    assert bigger.vocab_size == VOCAB + 64
    assert bigger.fingerprint != tok.fingerprint
    # Changing only the test split changes the corpus but not what the tokenizer learns.
    other = Corpus(
        name=corpus.name,
        train=corpus.train,
        valid=corpus.valid,
        test=corpus.test + "more\n",
        fingerprint=corpus.fingerprint + "x",
        description=corpus.description,
        stats=corpus.stats,
    )
    assert train_tokenizer(other, VOCAB).fingerprint == tok.fingerprint


def test_second_call_loads_from_cache(
    corpus: Corpus, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tok_mod.tokenizer_cache_path(corpus, VOCAB)
    mtime = path.stat().st_mtime_ns

    def no_training(text: str, vocab_size: int) -> None:
        raise AssertionError("tokenizer was retrained instead of loaded from the cache")

    monkeypatch.setattr(tok_mod, "_train", no_training)
    again = train_tokenizer(corpus, VOCAB)
    assert again.fingerprint == tok.fingerprint
    assert path.stat().st_mtime_ns == mtime


def test_corrupt_cache_is_retrained(corpus: Corpus, tok: Tokenizer) -> None:
    path = tok_mod.tokenizer_cache_path(corpus, VOCAB)
    path.write_text("{not json", encoding="utf-8")
    assert train_tokenizer(corpus, VOCAB).fingerprint == tok.fingerprint


def test_save_and_load(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)
    assert loaded.encode(TRICKY[3]) == tok.encode(TRICKY[3])
    with pytest.raises(CompressError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[]", encoding="utf-8")
    with pytest.raises(CompressError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_bad_vocab_size(corpus: Corpus, vocab_size: int) -> None:
    with pytest.raises(CompressError, match="at least 257"):
        train_tokenizer(corpus, vocab_size)


def test_minimum_vocab_is_bytes_plus_eos(corpus: Corpus) -> None:
    t = train_tokenizer(corpus, 257)
    assert t.vocab_size == 257
    assert t.decode(t.encode(TRICKY[4])) == TRICKY[4]


def test_chunked_encode_equals_whole_text_encode(tok: Tokenizer) -> None:
    # Long enough for several chunks, with the cases that could break a naive cut: trailing
    # spaces before newlines, blank lines, CRLF, leading spaces, non-ASCII at line edges.
    lines = []
    for i in range(3000):
        lines.append(
            [
                f"line {i} ends with spaces   ",
                "",
                f"  indented {i}",
                f"crlf {i}\r",
                f"é{i}ü",
                f"plain {i}.",
                "🎉",
            ][i % 7]
        )
    text = "\n".join(lines) + "\n" + _sample_text(10)
    chunks = list(tok_mod._chunks(text))
    assert len(chunks) > 3 and "".join(chunks) == text
    whole = tok.backend.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == whole


def test_encode_splits_matches_encode_and_is_cached(
    tok: Tokenizer, corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = encode_splits(tok, corpus)
    assert set(out) == {"train", "valid", "test"}
    for split, ids in out.items():
        assert ids.dtype == torch.long and ids.dim() == 1
        direct = tok.backend.encode(corpus.split(split), add_special_tokens=False).ids
        assert ids.tolist() == direct
        assert tok.decode(ids.tolist()) == corpus.split(split)
    path = tok_mod.tokens_cache_path(tok, corpus)
    assert path.suffix == ".safetensors" and path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_encoding(text: str) -> list[int]:
        raise AssertionError("splits were re-encoded instead of loaded from the cache")

    monkeypatch.setattr(tok, "encode", no_encoding)
    again = encode_splits(tok, corpus)
    for split in out:
        assert torch.equal(again[split], out[split])
    assert path.stat().st_mtime_ns == mtime


def test_unigram_perplexity_hand_computed() -> None:
    # vocab 4, train counts [2, 1, 0, 1] (N=4): p = (c + 1) / (N + V) = [3, 2, 1, 2] / 8.
    train = torch.tensor([0, 0, 1, 3])
    evals = torch.tensor([0, 2, 3])
    expected = math.exp(-(math.log(3 / 8) + math.log(1 / 8) + math.log(2 / 8)) / 3)
    assert unigram_perplexity(train, evals, 4) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((8**3 / 6) ** (1 / 3))
    # With no training data the model is uniform: perplexity equals the vocab size.
    assert unigram_perplexity(torch.tensor([], dtype=torch.long), evals, 7) == pytest.approx(7)


def test_unigram_perplexity_on_real_tokens(tok: Tokenizer, corpus: Corpus) -> None:
    ids = encode_splits(tok, corpus)
    ppl = unigram_perplexity(ids["train"], ids["valid"], tok.vocab_size)
    assert 10 < ppl < tok.vocab_size
    # Fitting on the eval data itself can only help a unigram model.
    assert unigram_perplexity(ids["valid"], ids["valid"], tok.vocab_size) < ppl


def test_unigram_perplexity_rejects_bad_input() -> None:
    with pytest.raises(CompressError, match=r"\[0, 4\)"):
        unigram_perplexity(torch.tensor([0, 4]), torch.tensor([1]), 4)
    with pytest.raises(CompressError, match="empty"):
        unigram_perplexity(torch.tensor([0]), torch.tensor([], dtype=torch.long), 4)
