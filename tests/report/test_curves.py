"""Training curves: every step reaches on_log, and the TensorBoard event files hold one point
per logged step for each tag."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.models.gpt import build_gpt
from compress.report.curves import TAGS, curve_charts, write_tensorboard
from compress.train import TrainConfig, lr_at, train

CFG = TrainConfig(
    max_steps=12, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=3, eval_every=5, eval_batches=1
)


def _curve(cfg: TrainConfig = CFG) -> list[dict]:
    ids = torch.arange(5000) * 7 % 32
    torch.manual_seed(0)
    model = build_gpt("tiny", 32)
    records: list[dict] = []
    report = train(model, ids, cfg, val_ids=ids, progress=False, on_log=records.append)
    assert report.steps == cfg.max_steps == len(records)
    return records


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return _curve()


def test_on_log_gets_every_step_with_lr_grad_norm_and_val_loss(records: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, CFG))
        assert math.isfinite(r["train_loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    # validation at every eval_every steps and at the last step
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 12]


def test_grad_norm_is_logged_without_clipping_too() -> None:
    records = _curve(TrainConfig(**{**CFG.__dict__, "grad_clip": None, "max_steps": 3}))
    assert all(r["grad_norm"] > 0 for r in records)


def test_event_files_hold_one_point_per_logged_step_per_tag(tmp_path, records) -> None:
    folders = write_tensorboard(tmp_path / "tb", {"baseline": records, "v/finetune": records[:4]})
    assert set(folders) == {"baseline", "v/finetune"}
    acc = EventAccumulator(str(tmp_path / "tb" / "baseline")).Reload()
    assert set(acc.Tags()["scalars"]) == set(TAGS.values())
    for key, tag in TAGS.items():
        logged = [r for r in records if key in r]
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in logged], tag
        assert [e.value for e in events] == pytest.approx([r[key] for r in logged], rel=1e-6)
    nested = EventAccumulator(str(tmp_path / "tb" / "v" / "finetune")).Reload()
    assert [e.step for e in nested.Scalars("loss/train")] == [1, 2, 3, 4]
    # a rerun replaces the phase's points instead of adding a second copy
    write_tensorboard(tmp_path / "tb", {"baseline": records})
    again = EventAccumulator(str(tmp_path / "tb" / "baseline")).Reload()
    assert len(again.Scalars("loss/train")) == len(records)
    assert not (tmp_path / "tb" / "v").exists()


def test_one_chart_per_phase_with_a_curve(records: list[dict]) -> None:
    charts = curve_charts({"baseline": records, "empty": []})
    assert [title for title, _ in charts] == ["baseline: loss vs step"]
    assert b"<svg" in charts[0][1] and b"val loss" in charts[0][1]
