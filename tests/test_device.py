"""The recipe's ``device``: auto picks what is there, a missing CUDA stops the run before any
work, and on a CUDA device a run measures there (latency timed to completion, GPU peak
allocated beside RSS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress import run as run_mod
from compress.errors import CompressError
from compress.evaluate.memory import peak_rss
from compress.metrics import BY_KEY, Measurement
from compress.models.adapter import adapter_for, model_device, resolve_device
from compress.models.gpt import GPT, GPTConfig
from compress.variant import save_variant

no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the behaviour of a machine without CUDA"
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_auto_follows_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
def test_auto_runs_the_workspace_on_the_cpu(tiny_workspace) -> None:
    assert tiny_workspace.recipe.device == "auto"
    assert tiny_workspace.device == torch.device("cpu")
    assert model_device(tiny_workspace.baseline) == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_a_one_line_error_before_any_work(
    tmp_path: Path, tiny_recipe_dict: dict, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("the run started work although its device is missing")

    monkeypatch.setattr(run_mod, "prepare", no_work)
    path = _write(tmp_path, {**tiny_recipe_dict, "device": "cuda"})
    with pytest.raises(CompressError, match="allowed here: auto, cpu"):
        resolve_device("cuda")
    code = run_mod.main([str(path), "--report-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {path}: device: 'cuda' asked for, but "), err
    assert err.rstrip().endswith("allowed here: auto, cpu"), err
    assert not (tmp_path / "out").exists()


def test_gpu_peak_is_a_catalog_metric_left_empty_on_the_cpu(tmp_path: Path) -> None:
    metric = BY_KEY["gpu_peak_bytes"]
    assert metric.unit == "bytes" and metric.better == "lower"
    assert "gpu_peak_bytes_ratio" in BY_KEY
    assert Measurement().to_dict()["gpu_peak_bytes"] is None
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, mlp_hidden=64, head_dim=16
        )
    ).eval()
    save_variant(model, tmp_path)
    rss = peak_rss(tmp_path, batch_size=1, seq_len=8, threads=1, device="cpu")
    assert "gpu_peak_bytes" not in rss
    assert rss["peak_rss_bytes"] >= rss["rss_after_load_bytes"] > 0


def test_a_distillation_student_is_built_on_its_teachers_device() -> None:
    # the meta device stands in for a GPU: no memory, but a device of its own
    cfg = GPTConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64, head_dim=16
    )
    teacher = GPT(cfg).to("meta")
    student = adapter_for(teacher).student(teacher, {"n_layer": 1}, seed=0)
    assert model_device(student) == torch.device("meta")
    assert len(student.blocks) == 1


@needs_cuda
def test_a_recipe_runs_and_measures_on_cuda(tmp_path: Path, tiny_recipe_dict: dict) -> None:
    path = _write(tmp_path, {**tiny_recipe_dict, "device": "cuda"})
    out = tmp_path / "out"
    code = run_mod.main([str(path), "--report-dir", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "int8", "nf4"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["error"])
        # the GPU held at least the variant's weights, and its process's RSS is measured too
        assert r["gpu_peak_bytes"] >= r["weight_bytes"], name
        assert r["peak_rss_bytes"] > 0 and r["latency_ms"] > 0
    assert abs(rows["int8"]["perplexity"] / rows["baseline"]["perplexity"] - 1) < 0.01
    assert rows["nf4"]["gpu_peak_bytes"] < rows["baseline"]["gpu_peak_bytes"]
