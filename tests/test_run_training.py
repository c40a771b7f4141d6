"""A run's training curves, accuracy and generation metrics, end to end through main()."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress import run as run_mod

FT_STEPS = 6


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, tiny_workspace, tiny_recipe_dict):
    """The tiny recipe (its baseline already cached by ``tiny_workspace``) with a fine-tuned
    variant and a pruned one; no peak-RSS child processes, few latency rounds."""
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["name"] = "curves"
    recipe["eval"]["memory"] = {"peak_rss": False}
    recipe["eval"]["latency"]["repeats"] = 3
    recipe["eval"]["generation"] = {"prompts": 4, "prompt_tokens": 16, "new_tokens": 16}
    ft_train = {"max_steps": FT_STEPS, "eval_every": 3, "seq_len": 64}
    recipe["variants"] = [
        {"name": "ft", "pipeline": [{"finetune": {"train": ft_train}}]},
        {"name": "pruned", "pipeline": [{"prune": {"sparsity": 0.6}}]},
    ]
    tmp = tmp_path_factory.mktemp("curves")
    path = tmp / "curves.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp / "report"
    code = run_mod.main([str(path), "--report-dir", str(out), "--no-progress"])
    return code, out


def test_cached_baseline_and_finetune_curves_reach_json_and_tensorboard(training_run) -> None:
    code, out = training_run
    assert code == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["baseline"]["cached"] is True  # its curve came from the cache entry
    baseline_steps = meta["baseline"]["train"]["steps"]  # a time cap may have ended it early
    training = meta["training"]
    # the fine-tuned variant's compute-matched control trains the baseline the same way
    assert set(training) == {"baseline", "ft/finetune", "ft-control/finetune"}
    assert [r["step"] for r in training["baseline"]] == list(range(1, baseline_steps + 1))
    assert [r["step"] for r in training["ft/finetune"]] == list(range(1, FT_STEPS + 1))
    assert [r["step"] for r in training["ft-control/finetune"]] == list(range(1, FT_STEPS + 1))
    for phase, records in training.items():
        acc = EventAccumulator(str(out / "tb" / phase)).Reload()
        assert len(acc.Scalars("loss/train")) == len(records), phase
        assert len(acc.Scalars("grad_norm")) == len(records), phase
        assert [e.step for e in acc.Scalars("loss/val")] == [
            r["step"] for r in records if "val_loss" in r
        ]
    html = (out / "report.html").read_text()
    assert "baseline: loss vs step" in html and "ft/finetune: loss vs step" in html
    assert "tensorboard --logdir" in html


def test_quality_metrics_for_every_variant(training_run) -> None:
    _, out = training_run
    df = pd.read_csv(out / "results.csv").set_index("variant")
    base, pruned = df.loc["baseline"], df.loc["pruned"]
    assert base["top1_agreement"] == 1.0 and base["bleu_fidelity"] == 100.0
    assert base["chrf_fidelity"] == 100.0 and base["top1_agreement_shortfall"] == 0.0
    assert 0 < pruned["top1_agreement"] < 1
    assert pruned["top1_accuracy_shortfall"] == pytest.approx(1 - pruned["top1_accuracy"])
    for col in ("top1_accuracy", "bleu", "chrf", "bleu_fidelity", "chrf_fidelity"):
        assert df[col].notna().all(), col
    data = json.loads((out / "results.json").read_text())
    gen = data["meta"]["generation"]
    assert len(gen["prompts"]) == len(gen["references"]) == 4
    continuations = data["meta"]["variants"]["pruned"]["continuations"]
    assert len(continuations) == 4
    html = (out / "report.html").read_text()
    assert "Greedy continuations" in html and "Accuracy and generation" in html
