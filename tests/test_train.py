from __future__ import annotations

import math

import pytest
import torch

from compress.models.gpt import build_gpt
from compress.train import TrainConfig, lr_at, sample_batch, train


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(9, cfg) == pytest.approx(1e-2)
    assert lr_at(10, cfg) == pytest.approx(1e-2)
    assert lr_at(55, cfg) == pytest.approx(0.55e-2)  # halfway through the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    steps = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_batches_are_next_token_shifted() -> None:
    ids = torch.arange(1000)
    x, y = sample_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)


def _patterned_tokens(n: int = 20_000) -> torch.Tensor:
    # A learnable stream: a repeating pattern over 32 symbols.
    return torch.arange(n) * 7 % 32


def test_training_learns_and_is_deterministic() -> None:
    ids = _patterned_tokens()
    cfg = TrainConfig(
        max_steps=60,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=30,
        eval_batches=2,
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_gpt("tiny", 32)
        report = train(model, ids, cfg, val_ids=ids, progress=False)
        runs.append((model, report))
    (m1, r1), (m2, r2) = runs
    assert r1.steps == 60 and r1.stopped_by == "max_steps"
    assert r1.history[-1]["val_loss"] < math.log(32) / 4  # far below the uniform loss
    assert r1.final_train_loss == r2.final_train_loss
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_time_budget_stops_training() -> None:
    cfg = TrainConfig(max_steps=10_000, max_minutes=0.02, batch_size=2, seq_len=16)
    report = train(build_gpt("tiny", 32), _patterned_tokens(), cfg, progress=False)
    assert report.stopped_by == "max_minutes"
    assert 0 < report.steps < 10_000
    assert report.seconds < 10


def test_early_stop_on_validation_loss() -> None:
    ids = _patterned_tokens()
    noise = torch.randint(0, 32, (5000,), generator=torch.Generator().manual_seed(1))
    # Validating on noise: the loss stops improving, so training stops early.
    cfg = TrainConfig(
        max_steps=400,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=10,
        eval_batches=2,
        early_stop_patience=2,
    )
    report = train(build_gpt("tiny", 32), ids, cfg, val_ids=noise, progress=False)
    assert report.stopped_by == "early_stop"
    assert report.steps < 400


def test_bf16_autocast_trains() -> None:
    cfg = TrainConfig(
        max_steps=30,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=3,
        bf16=True,
        eval_every=30,
        eval_batches=1,
    )
    ids = _patterned_tokens()
    report = train(build_gpt("tiny", 32), ids, cfg, val_ids=ids, progress=False)
    assert math.isfinite(report.final_train_loss)
    assert report.history[-1]["val_loss"] < math.log(32)


def test_step_hook_and_best_weights_restored_on_early_stop() -> None:
    ids = _patterned_tokens()
    noise = torch.randint(0, 32, (5000,), generator=torch.Generator().manual_seed(1))
    calls = []
    cfg = TrainConfig(
        max_steps=400,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=10,
        eval_batches=2,
        early_stop_patience=2,
    )
    model = build_gpt("tiny", 32)
    report = train(model, ids, cfg, val_ids=noise, progress=False, on_step=lambda: calls.append(1))
    assert len(calls) == report.steps
    assert report.best_step < report.steps  # it stopped after evaluations that did not improve
    # The weights kept are the best ones: their validation loss is the best one recorded.
    from compress.train import estimate_loss, lm_loss

    assert estimate_loss(model, noise, cfg, lm_loss) == pytest.approx(report.best_val_loss)


def test_validation_can_watch_another_loss() -> None:
    from compress.train import estimate_loss, lm_loss

    ids = _patterned_tokens()
    cfg = TrainConfig(
        max_steps=20, batch_size=4, seq_len=32, warmup_steps=2, eval_every=20, eval_batches=1
    )

    def doubled(model, x, y):
        return 2 * lm_loss(model, x, y)

    for val_fn, expect_fn in ((None, doubled), (lm_loss, lm_loss)):
        model = build_gpt("tiny", 32)
        report = train(
            model, ids, cfg, val_ids=ids, loss_fn=doubled, val_loss_fn=val_fn, progress=False
        )
        assert report.history[-1]["val_loss"] == pytest.approx(
            estimate_loss(model, ids, cfg, expect_fn)
        )
