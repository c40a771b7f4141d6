"""Cache entries are checked against the sha256 written with them: a damaged entry is named in
a one-line warning, rebuilt, and the numbers equal a clean run's; it is never "loaded"."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from compress.cache import digest_path, read_entry, write_entry
from compress.data.tokenizer import tokenizer_cache_path, tokens_cache_path
from compress.evaluate.perplexity import perplexity
from compress.metrics import Measurement, measurement_problem
from compress.recipe import recipe_from_dict
from compress.workbench import prepare
from tests.conftest import REPO, require_shared


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own cache: every test damages an entry and leaves it rebuilt."""
    return tmp_path_factory.mktemp("faults-cache")


@pytest.fixture
def own_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(cache))
    return cache


def _recipe_dict(tmp_path: Path) -> dict:
    text = require_shared("tinyshakespeare/input.txt").read_text()
    parts = {"train": text[:40_000], "valid": text[40_000:50_000], "test": text[50_000:60_000]}
    for split, part in parts.items():
        (tmp_path / f"{split}.txt").write_text(part)
    data = {
        "name": "cache",
        "model": {"preset": "tiny"},
        "data": {
            "corpus": "files",
            "files": {s: [str(tmp_path / f"{s}.txt")] for s in parts},
            "vocab_size": 300,
        },
        "train": {"max_steps": 15, "seq_len": 64, "eval_every": 15, "eval_batches": 1},
        "eval": {"perplexity": {"seq_len": 64}, "latency": {"seq_len": 64}},
        "variants": [{"name": "q", "pipeline": [{"int8": {}}]}],
    }
    return data


def _recipe(data: dict):
    return recipe_from_dict(yaml.safe_load(yaml.safe_dump(data)), "cache.yaml", "cache")


def _ppl(ws) -> float:
    return perplexity(ws.baseline, ws.tokens["test"], 64).perplexity


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def first_run(cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """A first, clean run: the recipe, its workspace, and its baseline's test perplexity."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESS_CACHE_DIR", str(cache))
        data = _recipe_dict(tmp_path_factory.mktemp("corpus"))
        recipe = _recipe(data)
        ws = prepare(recipe, REPO, progress=False)
    assert not ws.baseline_info.cached
    return recipe, ws, _ppl(ws), data


@pytest.fixture
def clean(first_run, own_cache: Path):
    """The first run, with this module's cache in use (every entry sound again)."""
    return first_run[:3]


def test_clean_entries_are_reused_without_warning(clean, caplog) -> None:
    recipe, ws, ppl = clean
    caplog.set_level(logging.INFO)
    again = prepare(recipe, REPO, progress=False)
    assert again.baseline_info.cached and "loaded from cache" in again.baseline_info.headline()
    assert _ppl(again) == ppl
    assert not _warnings(caplog)


def test_flipped_bytes_in_cached_baseline_retrain_it(clean, caplog) -> None:
    recipe, ws, ppl = clean
    weights = Path(ws.baseline_info.path) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    middle = len(raw) // 2  # inside the tensor data, past the header
    raw[middle : middle + 64] = bytes(64)
    weights.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again = prepare(recipe, REPO, progress=False)
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(ws.baseline_info.path) in warned[0]
    assert "does not match its checksum (model.safetensors)" in warned[0]
    assert not again.baseline_info.cached
    assert "loaded from cache" not in again.baseline_info.headline()
    assert _ppl(again) == ppl  # retrained from the same seed: the same model
    caplog.clear()
    third = prepare(recipe, REPO, progress=False)  # the rebuilt entry is trusted again
    assert third.baseline_info.cached and not _warnings(caplog)


def test_baseline_entry_without_checksums_is_retrained(clean, caplog) -> None:
    recipe, ws, ppl = clean
    (Path(ws.baseline_info.path) / "CHECKSUMS.json").unlink()
    with caplog.at_level(logging.WARNING):
        again = prepare(recipe, REPO, progress=False)
    assert any("has no checksum" in w for w in _warnings(caplog))
    assert not again.baseline_info.cached and _ppl(again) == ppl


def test_altered_token_ids_are_encoded_again(clean, caplog) -> None:
    recipe, ws, ppl = clean
    path = tokens_cache_path(ws.tokenizer, ws.corpus)
    tensors = load_file(str(path))
    test = tensors["test"].clone()
    test[: test.numel() // 2] = (test[: test.numel() // 2] + 1) % ws.tokenizer.vocab_size
    save_file({**tensors, "test": test}, str(path))  # other valid ids, same file layout
    with caplog.at_level(logging.WARNING):
        again = prepare(recipe, REPO, progress=False)
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(path) in warned[0] and "cached tokens" in warned[0]
    assert torch.equal(again.tokens["test"], ws.tokens["test"])
    assert _ppl(again) == ppl
    assert again.baseline_info.cached  # the baseline's own entry was sound
    assert read_entry(path, "tokens") is not None  # and the rebuilt entry is sealed


def test_damaged_tokenizer_is_trained_again(clean, caplog) -> None:
    recipe, ws, ppl = clean
    path = tokenizer_cache_path(ws.corpus, recipe.data.vocab_size)
    path.write_text(path.read_text().replace('"e"', '"E"', 1))
    with caplog.at_level(logging.WARNING):
        again = prepare(recipe, REPO, progress=False)
    assert any(str(path) in w and "checksum" in w for w in _warnings(caplog))
    assert again.tokenizer.fingerprint == ws.tokenizer.fingerprint and _ppl(again) == ppl


def test_read_entry_names_every_problem(tmp_path, caplog) -> None:
    path = tmp_path / "e.json"
    assert read_entry(path, "entry") is None and not caplog.records  # absent: no warning
    write_entry(path, b'{"a": 1}')
    assert read_entry(path, "entry") == b'{"a": 1}'
    path.write_bytes(b'{"a": 2}')
    with caplog.at_level(logging.WARNING):
        assert read_entry(path, "entry") is None
    digest_path(path).unlink()
    with caplog.at_level(logging.WARNING):
        assert read_entry(path, "entry") is None
    assert [m.split(str(path))[1] for m in _warnings(caplog)] == [
        " does not match its checksum; rebuilding it",
        " has no checksum; rebuilding it",
    ]


def _complete() -> dict:
    m = Measurement(
        perplexity=30.0,
        nll=3.4,
        eval_tokens=100,
        latency_ms=2.0,
        latency_baseline_ms=2.0,
        latency_ratio=1.0,
        weight_bytes=1000,
        param_count=250,
        saved_bytes=1200,
    )
    return m.to_dict()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: {}, "no 'perplexity'"),
        (lambda d: [], "not a mapping"),
        (lambda d: {**d, "perplexity": None}, "'perplexity' is missing its value"),
        (lambda d: {**d, "perplexity": "12"}, "'perplexity' is '12', not a number"),
        (lambda d: {**d, "weight_bytes": 1.5}, "'weight_bytes' is 1.5, not an integer"),
        (lambda d: {**d, "param_count": True}, "not an integer"),
        (lambda d: {**d, "latency_ms": float("inf")}, "'latency_ms' is inf"),
        (lambda d: {k: v for k, v in d.items() if k != "sparsity"}, "no 'sparsity'"),
    ],
)
def test_measurement_schema(change, problem) -> None:
    assert measurement_problem(_complete()) is None
    assert problem in measurement_problem(change(_complete()))


def test_cached_sweep_result_is_reused_only_when_sound(own_cache, caplog) -> None:
    from compress.sweep import objective

    key = "ab" + "0" * 22
    entry = objective.result_path(key)
    objective.store_result(key, _complete())
    assert objective.cached_result([], key) == (_complete(), "cache")
    for damage in ("bytes", "schema"):
        if damage == "bytes":
            entry.write_text("{}")
        else:
            write_entry(entry, b"{}")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert objective.cached_result([], key) == (None, None)
        (warned,) = _warnings(caplog)
        assert str(entry) in warned
        assert ("checksum" in warned) == (damage == "bytes")
        assert ("no 'perplexity'" in warned) == (damage == "schema")


@pytest.mark.slow
def test_sweep_result_replaced_by_empty_mapping_is_measured_again(
    tmp_path, first_run, own_cache, caplog
) -> None:
    from compress.report.study import readable
    from compress.run import main
    from compress.sweep import objective
    from tests.sweep.conftest import sweep_study, write_recipe

    recipe = {k: v for k, v in first_run[3].items() if k != "variants"}
    recipe["name"] = "cache-faults"
    recipe["eval"] = {
        **recipe["eval"],
        "memory": {"peak_rss": False},
        "latency": {"batch_size": 1, "seq_len": 64, "warmup": 0, "repeats": 3},
    }
    recipe["sweep"] = {
        "trials": 2,
        "params": {"quantizer": {"choice": ["none", "int8"]}},
        "pipeline": [{"int8": {}, "when": {"quantizer": "int8"}}],
        "seeds": {"int8": {"quantizer": "int8"}},
    }
    path = write_recipe(tmp_path / "sweep.yaml", recipe)

    def sweep(out: str) -> dict:
        assert main([str(path), "--report-dir", str(tmp_path / out), "--no-progress"]) == 0
        trials = sweep_study(tmp_path / out, "cache-faults").get_trials()
        return trials[1].user_attrs  # the int8 seed

    first = sweep("a")
    entry = objective.result_path(first["config_key"])
    assert read_entry(entry, "result") is not None
    for damage in ("bytes", "schema"):
        if damage == "bytes":
            entry.write_text("{}")  # the fault as found: the file replaced by {}
        else:
            write_entry(entry, b"{}")  # a sound checksum over an invalid record
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = sweep(f"b-{damage}")
        warned = [w for w in _warnings(caplog) if str(entry) in w]
        assert len(warned) == 1, _warnings(caplog)
        expected = "does not match its checksum" if damage == "bytes" else "no 'perplexity'"
        assert expected in warned[0]
        assert again["cached_from"] is None  # measured again, not reused
        assert again["perplexity"] == first["perplexity"]
        assert again["weight_bytes"] == first["weight_bytes"]
        # the entry keeps the full number, the trial's user attribute the digits it shows
        cached = json.loads(read_entry(entry, "result"))["perplexity"]
        assert readable(cached) == first["perplexity"]
    reused = sweep("c")  # the rewritten entry is sound: reused
    assert reused["cached_from"] == "cache" and reused["perplexity"] == first["perplexity"]
