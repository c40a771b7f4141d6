"""The spine end to end: `python -m compress.run RECIPE` on the tiny preset."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from compress import run as run_mod
from compress.models import baseline as baseline_mod

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, recipe: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_root, tiny_recipe_dict):
    """One full run of the tiny recipe (baseline, int8, nf4) through the CLI's main()."""
    tmp = tmp_path_factory.mktemp("run")
    os.environ["COMPRESS_CACHE_DIR"] = str(cache_root)
    recipe = _write(tmp, tiny_recipe_dict)
    out = tmp / "report"
    code = run_mod.main([str(recipe), "--report-dir", str(out), "--no-progress"])
    return code, out, recipe


def test_run_succeeds_and_writes_all_report_files(first_run) -> None:
    code, out, _ = first_run
    assert code == 0
    for name in ("results.csv", "results.json", "report.html", "study.db"):
        assert (out / name).stat().st_size > 0, name


def test_csv_has_one_row_per_variant_baseline_first(first_run) -> None:
    _, out, _ = first_run
    df = pd.read_csv(out / "results.csv")
    assert list(df["variant"]) == ["baseline", "int8", "nf4"]
    assert (df["status"] == "ok").all()
    base = df.iloc[0]
    assert base["perplexity_ratio"] == 1.0 and base["weight_bytes_ratio"] == 1.0
    int8 = df.set_index("variant").loc["int8"]
    nf4 = df.set_index("variant").loc["nf4"]
    # The acceptance numbers for the spine, on the tiny preset.
    assert abs(int8["perplexity_ratio"] - 1) < 0.01
    assert int8["quantized_layer_bytes_ratio"] <= 0.3
    assert nf4["quantized_layer_bytes_ratio"] < int8["quantized_layer_bytes_ratio"]
    assert nf4["weight_bytes"] < int8["weight_bytes"] < base["weight_bytes"]
    for col in (
        "latency_ms",
        "latency_iqr_ms",
        "saved_bytes",
        "peak_rss_bytes",
        "param_count",
        "eval_tokens",
        "latency_ratio",
        "peak_rss_bytes_ratio",
    ):
        assert df[col].notna().all(), col
    assert (df["eval_tokens"] == df["eval_tokens"].iloc[0]).all()  # same tokens for all
    assert (df["param_count"] == base["param_count"]).all()  # quantizing keeps the count


def test_baseline_beats_unigram_and_report_says_so(first_run) -> None:
    _, out, _ = first_run
    data = json.loads((out / "results.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert rows[0]["perplexity"] < meta["unigram_perplexity"]
    html = (out / "report.html").read_text()
    assert "unigram perplexity" in html and f"{meta['unigram_perplexity']:.3f}" in html
    assert meta["corpus"]["fingerprint"] in html
    assert "Stage report: int8 / int8" in html and "Linear8bitLt" in html


def test_study_has_one_trial_per_variant(first_run) -> None:
    _, out, _ = first_run
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert study.metric_names == ["perplexity", "latency_ms", "weight_bytes"]
    trials = study.get_trials()
    assert [t.params["variant"] for t in trials] == ["baseline", "int8", "nf4"]
    df = pd.read_csv(out / "results.csv")
    for t, (_, row) in zip(trials, df.iterrows()):
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.values[0] == pytest.approx(row["perplexity"])
        assert t.values[2] == row["weight_bytes"]
        assert t.user_attrs["peak_rss_bytes"] == row["peak_rss_bytes"]


def test_second_run_reuses_the_cached_baseline(first_run, tmp_path, monkeypatch, capsys) -> None:
    _, _, recipe = first_run
    data = yaml.safe_load(recipe.read_text())
    data["variants"] = data["variants"][:1]
    path = _write(tmp_path, data)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached baseline should have been used")

    monkeypatch.setattr(baseline_mod, "train", no_training)
    code = run_mod.main([str(path), "--report-dir", str(tmp_path / "r"), "--no-progress"])
    assert code == 0
    assert "loaded from cache" in capsys.readouterr().out
    meta = json.loads((tmp_path / "r" / "results.json").read_text())["meta"]
    assert meta["baseline"]["cached"] is True


def test_a_failing_variant_does_not_lose_the_others(first_run, tmp_path, capsys) -> None:
    _, _, recipe = first_run
    data = yaml.safe_load(recipe.read_text())
    # Valid recipe, but the selector matches nothing in the model: fails at build time.
    data["variants"] = [
        {"name": "broken", "pipeline": [{"int8": {"targets": ["no_such_layer"]}}]},
        {"name": "int8", "pipeline": [{"int8": {}}]},
    ]
    code = run_mod.main(
        [str(_write(tmp_path, data)), "--report-dir", str(tmp_path / "r"), "--no-progress"]
    )
    assert code == 1
    df = pd.read_csv(tmp_path / "r" / "results.csv")
    assert list(df["variant"]) == ["baseline", "broken", "int8"]
    assert list(df["status"]) == ["ok", "failed", "ok"]
    assert "no_such_layer" in df.set_index("variant").loc["broken", "error"]
    assert "1 of 3 variants failed" in capsys.readouterr().err


def test_terminal_fits_80_columns_and_a_log_gets_lines_not_carriage_returns(
    first_run, tmp_path, capsys
) -> None:
    """Progress on (the default) with stdout captured, i.e. not a terminal: whole lines for
    each phase, no carriage return; the summary, with a failed variant and a latency made
    noisy by an unreachable precision target, fits 80 columns and has its legend."""
    _, _, recipe = first_run
    data = yaml.safe_load(recipe.read_text())
    data["variants"] = [
        {"name": "broken", "pipeline": [{"int8": {"targets": ["no_such_layer"]}}]},
        {"name": "int8", "pipeline": [{"int8": {}}]},
    ]
    data["eval"]["latency"].update(ci_target=1e-6, max_seconds=0.5)
    report = tmp_path / "r"
    code = run_mod.main([str(_write(tmp_path, data)), "--report-dir", str(report)])
    assert code == 1
    captured = capsys.readouterr()
    assert "\r" not in captured.out and "\r" not in captured.err
    out = captured.out.splitlines()
    for phase in ("corpus: reading ...", "int8: perplexity", "int8: latency", "broken: building"):
        assert any(line.startswith(phase) for line in out), phase
    table = out.index(next(line for line in out if line.startswith("variant ")))
    summary = out[table : out.index(next(line for line in out if line.startswith("report: ")))]
    summary = [line for line in summary if str(tmp_path) not in line]  # paths are as long as
    assert [line for line in summary if len(line) > 80] == []
    assert any(line.startswith("int8 ") and "*" in line for line in summary)  # noisy latency
    assert any(line.startswith("broken ") and "FAILED" in line for line in summary)
    words = " ".join(line.strip() for line in summary)
    assert "* = noisy" in words and "x = ratio to the baseline" in words
    assert "FAILED broken: " in words and "no_such_layer" in words
    assert any(line.startswith("every metric of every variant: ") for line in out)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compress.run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "missing.yaml: file not found"),
        ("model: {preset: huge}\n", "model.preset: Input should be 'tiny' or 'small', got 'huge'"),
        (
            "variants:\n  - name: a\n    pipeline: [{int8: {treshold: 4}}]\n",
            "variants[0].pipeline[0].int8.treshold: unknown key; allowed keys: threshold",
        ),
        ("a: [1,\n", "invalid YAML"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, content, expected) -> None:
    name = "missing.yaml" if content is None else "bad.yaml"
    if content is not None:
        (tmp_path / name).write_text(content)
    proc = _cli(name, cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_bad_data_path_exits_2(tmp_path, tiny_recipe_dict) -> None:
    data = copy.deepcopy(tiny_recipe_dict)
    data["data"] = {"corpus": "files", "files": ["nowhere/*.txt"]}
    _write(tmp_path, data, "files.yaml")
    proc = _cli("files.yaml", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "nowhere/*.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_composes_and_reports_every_step(first_run, tmp_path) -> None:
    """prune -> distill (recover) -> int8, each step a row that starts from the previous one."""
    _, _, recipe = first_run
    data = yaml.safe_load(recipe.read_text())
    fast = {"max_steps": 30, "eval_every": 15, "eval_batches": 1, "seq_len": 64, "lr": 1e-3}
    data["variants"] = [
        {"name": "pruned", "pipeline": [{"prune": {"sparsity": 0.5}}]},
        {"name": "recovered", "from": "pruned", "pipeline": [{"distill": {"train": fast}}]},
        {"name": "recovered-int8", "from": "recovered", "pipeline": [{"int8": {}}]},
    ]
    out = tmp_path / "r"
    code = run_mod.main([str(_write(tmp_path, data)), "--report-dir", str(out), "--no-progress"])
    assert code == 0
    df = pd.read_csv(out / "results.csv").set_index("variant")
    # recovered trains, so its compute-matched control is a row of its own
    assert list(df.index) == [
        "baseline",
        "pruned",
        "recovered",
        "recovered-control",
        "recovered-int8",
    ]
    # The row describes the whole chain from the baseline, as readable text.
    stages = df.loc["recovered-int8", "stages"]
    assert re.fullmatch(r"prune 50% magnitude -> distill \d+ steps -> int8", stages), stages
    # Pruned zeros survive recovery (masked) and int8 quantization (zero codes).
    assert df.loc["pruned", "sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert df.loc["recovered", "sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert df.loc["recovered-int8", "sparsity"] >= 0.5
    # Recovery helps, and int8 of the recovered model costs < 1% on top of it.
    assert df.loc["recovered", "perplexity"] < df.loc["pruned", "perplexity"]
    ratio = df.loc["recovered-int8", "perplexity"] / df.loc["recovered", "perplexity"]
    assert abs(ratio - 1) < 0.01
