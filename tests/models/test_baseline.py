"""The built-in baseline's cache: partial entries, resuming, and machine-speed-free keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compress.models import baseline as baseline_mod
from compress.models.baseline import baseline_key, get_baseline
from compress.models.gpt import PRESETS, GPTConfig
from compress.train import TrainConfig

CFG = GPTConfig(vocab_size=64, **PRESETS["tiny"])
TRAIN = TrainConfig(
    max_steps=9,
    batch_size=4,
    seq_len=32,
    lr=3e-3,
    warmup_steps=2,
    eval_every=4,
    eval_batches=1,
    checkpoint_every=2,
    seed=3,
)


def _tokens() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "train": torch.randint(0, 64, (8000,), generator=gen),
        "valid": torch.randint(0, 64, (2000,), generator=gen),
    }


def _baseline(**kwargs):
    return get_baseline(CFG, _tokens(), "corpus-fp", "tok-fp", TRAIN, progress=False, **kwargs)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resumed_across_three_runs_equals_one_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "one"))
    whole, info = _baseline()
    assert not info.partial and info.train["steps"] == 9 and info.train["runs"] == 1

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "three"))
    _, first = _baseline(stop_at=3)
    assert first.partial and first.train["stopped_by"] == "step_cap"
    assert (first.train["steps"], first.train["planned_steps"]) == (3, 9)
    assert first.steps_text() == "partial: 3 of 9 steps"
    assert "PARTIAL" in first.headline()
    warning = first.partial_warning(123.4)
    assert warning is not None and "train.partial: accept" in warning and "123.40" in warning
    _, second = _baseline(stop_at=7)
    assert second.partial and second.train["steps"] == 7 and second.train["runs"] == 2
    resumed, third = _baseline()
    assert not third.partial and third.train["steps"] == 9 and third.train["runs"] == 3
    assert third.partial_warning(1.0) is None
    _assert_same_weights(whole, resumed)  # bitwise, not approximately
    assert third.train["history"] == info.train["history"]

    def no_training(*args, **kwargs):
        raise AssertionError("a complete cached baseline is loaded, not trained")

    monkeypatch.setattr(baseline_mod, "train", no_training)
    cached, again = _baseline()
    assert again.cached and not again.partial
    _assert_same_weights(whole, cached)


def test_accept_uses_a_partial_baseline_as_it_is(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    partial, _ = _baseline(stop_at=4)

    def no_training(*args, **kwargs):
        raise AssertionError("partial: accept must not train")

    with monkeypatch.context() as m:
        m.setattr(baseline_mod, "train", no_training)
        model, info = _baseline(partial="accept")
    assert info.cached and info.partial and info.steps_text() == "partial: 4 of 9 steps"
    _assert_same_weights(partial, model)
    _, resumed = _baseline()  # the default resumes it
    assert not resumed.partial and resumed.train["runs"] == 2


def test_interrupted_training_keeps_the_last_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    real_train = baseline_mod.train
    steps = []

    def ctrl_c_at_step_5(*args, **kwargs):
        def on_step() -> None:
            steps.append(1)
            if len(steps) == 5:
                raise KeyboardInterrupt

        return real_train(*args, on_step=on_step, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(baseline_mod, "train", ctrl_c_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            _baseline()
    # checkpoint_every=2: steps 2 and 4 were checkpointed, step 5 is lost
    with monkeypatch.context() as m:
        m.setattr(baseline_mod, "train", lambda *a, **k: pytest.fail("accept must not train"))
        _, info = _baseline(partial="accept")
    assert info.partial and info.train["steps"] == 4
    resumed, done = _baseline()
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "whole"))
    whole, _ = _baseline()
    assert done.train["steps"] == 9
    _assert_same_weights(whole, resumed)


def test_key_ignores_when_training_happens() -> None:
    key = baseline_key(CFG, "c", "t", TRAIN)
    for change in ({"max_minutes": 1.0}, {"checkpoint_every": 50}):
        assert baseline_key(CFG, "c", "t", dataclasses.replace(TRAIN, **change)) == key
    assert baseline_key(CFG, "c", "t", dataclasses.replace(TRAIN, max_steps=10)) != key
