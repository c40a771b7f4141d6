"""A run on a partial baseline says so in the terminal, the CSV/JSON and the HTML."""

from __future__ import annotations

import copy
import json

import pandas as pd
import yaml

from compress import run as run_mod
from compress.models import baseline as baseline_mod


def test_partial_baseline_is_reported_loudly(tmp_path, monkeypatch, capsys, tiny_recipe_dict):
    data = copy.deepcopy(tiny_recipe_dict)
    data["train"]["max_steps"] = 40  # its own cache entry, not the session's tiny baseline
    data["variants"] = [{"name": "int8", "pipeline": [{"int8": {}}]}]
    data["eval"]["memory"] = {"peak_rss": False}
    recipe = tmp_path / "partial.yaml"
    recipe.write_text(yaml.safe_dump(data))
    real_train = baseline_mod.train

    def stopped_at_step_3(*args, **kwargs):  # what the time cap does, without a clock
        return real_train(*args, **{**kwargs, "stop_at": 3})

    monkeypatch.setattr(baseline_mod, "train", stopped_at_step_3)
    out = tmp_path / "report"
    assert run_mod.main([str(recipe), "--report-dir", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "PARTIAL: 3 of 40 steps" in captured.out
    assert "the baseline is PARTIAL (3 of 40 steps" in captured.err
    assert "train.partial: accept" in captured.err
    df = pd.read_csv(out / "results.csv")
    assert list(df["baseline_partial"]) == ["partial: 3 of 40 steps"] * 2
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["baseline"]["train"]["partial"] is True
    assert meta["baseline"]["train"]["steps"] == 3
    page = (out / "report.html").read_text()
    assert page.index("Partial baseline") < page.index("Summary")
    assert "partial: 3 of 40 steps" in page
