"""A corpus that is not text, and a baseline no better than token frequencies, are said in one
line in the terminal and listed under the report's notes."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys

import pytest
import yaml

from compress.data.corpus import files_corpus
from compress.sanity import baseline_note, binary_signs
from tests.conftest import REPO, require_shared


def _random_bytes(n: int) -> bytes:
    return random.Random(0).randbytes(n)


def test_text_has_no_binary_signs() -> None:
    text = require_shared("tinyshakespeare/input.txt").read_bytes()
    assert binary_signs(text) is None
    assert binary_signs(text.decode()) is None
    assert binary_signs("tabs\tand\r\nform feeds\f are text; so is é, ü and 漢字") is None


def test_random_bytes_show_every_sign() -> None:
    data = _random_bytes(100_000)
    signs = binary_signs(data)
    nul = data.count(0)
    assert nul > 0 and f"{nul:,} NUL bytes" in signs
    assert "% control bytes" in signs and "bytes that are not UTF-8" in signs
    # once decoded (undecodable bytes replaced), the same file still looks binary
    assert "not UTF-8" in binary_signs(data.decode("utf-8", errors="replace"))


def test_latin1_text_is_flagged_as_not_utf8_only() -> None:
    signs = binary_signs("café crème brûlée\n".encode("latin-1"))
    assert signs == "4 bytes that are not UTF-8"  # é, è, û, é


def test_a_few_control_bytes_are_tolerated() -> None:
    text = b"a" * 1000 + b"\x1b[0m"  # one escape sequence in a long text
    assert binary_signs(text) is None
    assert "control bytes" in binary_signs(b"a" * 100 + b"\x01\x02")


def test_binary_file_in_a_files_corpus_is_noted(tmp_path, caplog) -> None:
    text = require_shared("tinyshakespeare/input.txt").read_text()[:20_000]
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.bin").write_bytes(_random_bytes(5_000))
    with caplog.at_level(logging.WARNING):
        clean = files_corpus(["a.txt"], base_dir=tmp_path)
    assert clean.notes == () and not caplog.records
    with caplog.at_level(logging.WARNING):
        corpus = files_corpus(["a.txt", "b.bin"], base_dir=tmp_path)
    assert len(corpus.notes) == 1 and "b.bin looks binary" in corpus.notes[0]
    assert [r.getMessage() for r in caplog.records] == list(corpus.notes)
    # the same file in two splits is noted once
    split = {"train": ["b.bin"], "valid": ["b.bin"], "test": ["a.txt"]}
    assert len(files_corpus(split, base_dir=tmp_path).notes) == 1


@pytest.mark.parametrize(
    ("ppl", "unigram", "noted"),
    [(10.0, 20.0, False), (20.0, 20.0, True), (35.5, 20.0, True), (None, 20.0, False)],
)
def test_baseline_note(ppl, unigram, noted) -> None:
    note = baseline_note(ppl, unigram, "test")
    assert (note is not None) == noted
    if noted:
        assert f"{ppl:.2f}" in note and f"{unigram:.2f}" in note and "unigram" in note


def test_run_notes_list_corpus_notes_then_a_weak_baseline() -> None:
    from types import SimpleNamespace

    from compress.run import _notes_section, run_notes

    recipe = SimpleNamespace(eval=SimpleNamespace(perplexity=SimpleNamespace(split="test")))
    corpus = SimpleNamespace(notes=("corpus file x.bin looks binary, not text (3 NUL bytes)",))
    ws = SimpleNamespace(recipe=recipe, corpus=corpus, unigram_perplexity=120.0)
    assert run_notes(ws, 80.0) == list(corpus.notes)
    notes = run_notes(ws, 300.0)
    assert notes[0] == corpus.notes[0] and "300.00" in notes[1] and "120.00" in notes[1]
    ((title, body),) = _notes_section(notes)
    assert title == "Notes" and body.count("<li>") == 2 and "x.bin" in body
    assert _notes_section([]) == []


@pytest.mark.slow
def test_binary_corpus_run_warns_and_notes_it(tmp_path) -> None:
    data = _random_bytes(60_000)
    (tmp_path / "noise.bin").write_bytes(data)
    recipe = {
        "name": "noise",
        "model": {"preset": "tiny"},
        "data": {"corpus": "files", "files": ["noise.bin"], "fractions": [0.8, 0.1, 0.1]},
        "train": {"max_steps": 4, "seq_len": 32, "eval_every": 4, "eval_batches": 1},
        "eval": {
            "perplexity": {"seq_len": 32, "max_tokens": 1024},
            "latency": {"batch_size": 1, "seq_len": 32, "warmup": 0, "repeats": 3},
            "memory": {"peak_rss": False},
        },
        "variants": [{"name": "q", "pipeline": [{"dynamic-int8": {}}]}],
    }
    recipe["data"]["vocab_size"] = 300
    (tmp_path / "noise.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "report"
    env = {**os.environ, "COMPRESS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "compress.run", "noise.yaml", "--report-dir", str(out)]
        + ["--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    binary = [line for line in err.splitlines() if "noise.bin looks binary" in line]
    unigram = [line for line in err.splitlines() if "no better than a unigram" in line]
    assert len(binary) == 1 and len(unigram) == 1, err
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert len(meta["notes"]) == 2
    assert "noise.bin looks binary" in meta["notes"][0] and "NUL bytes" in meta["notes"][0]
    # the note's numbers are the report's: the baseline's perplexity and the unigram's
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert f"{rows[0]['perplexity']:.2f}" in meta["notes"][1]
    assert f"{meta['unigram_perplexity']:.2f}" in meta["notes"][1]
    assert rows[0]["perplexity"] >= meta["unigram_perplexity"]
    page = (out / "report.html").read_text()
    assert "Notes" in page and "looks binary" in page and "no better than a unigram" in page
