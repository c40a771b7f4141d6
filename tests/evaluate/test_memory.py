from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.evaluate.memory import (
    count_zeros,
    dir_bytes,
    module_weight_bytes,
    param_count,
    peak_rss,
)
from compress.models.gpt import build_gpt
from compress.variant import save_variant


def test_weight_bytes_of_a_linear_layer_are_exact() -> None:
    assert module_weight_bytes(nn.Linear(64, 32)) == (64 * 32 + 32) * 4
    assert module_weight_bytes(nn.Linear(64, 32, bias=False).half()) == 64 * 32 * 2


def test_tied_weights_are_counted_once() -> None:
    model = build_gpt("tiny", 500)
    state = model.state_dict()
    naive = sum(t.nbytes for t in state.values())
    assert module_weight_bytes(model) == naive - state["lm_head.weight"].nbytes


def test_int8_layer_bytes_are_codes_plus_row_scales() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    q, _ = run_stage("int8", model, REGISTRY["int8"].config_cls(ignore=[]), StageContext())
    # int8 codes, one fp32 scale per output row, fp32 bias, 1-byte format flag.
    assert module_weight_bytes(q) == 64 * 32 + 32 * 4 + 32 * 4 + 1
    assert param_count(q) == 64 * 32 + 32


def test_nf4_params_are_counted_at_logical_size() -> None:
    model = nn.Sequential(nn.Linear(128, 64))
    q, _ = run_stage("nf4", model, REGISTRY["nf4"].config_cls(ignore=[]), StageContext())
    assert param_count(q) == 128 * 64 + 64
    assert module_weight_bytes(q) < (128 * 64) // 2 + 64 * 4 + 2000  # codes + absmax + maps


def test_sparsity_counts_exact_zeros() -> None:
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight[:3] = 0
    zeros, total = count_zeros(lin)
    assert (zeros, total) == (30, 100)


@pytest.mark.parametrize("stage", [None, "int8"])
def test_peak_rss_of_saved_variant_in_child_process(tmp_path, stage) -> None:
    model = build_gpt("tiny", 256).eval()
    if stage:
        model, _ = run_stage(
            stage, copy.deepcopy(model), REGISTRY[stage].config_cls(), StageContext()
        )
    save_variant(model, tmp_path)
    assert dir_bytes(tmp_path) > module_weight_bytes(model)  # safetensors header + manifest
    rss = peak_rss(tmp_path, batch_size=2, seq_len=32, threads=1)
    assert rss["rss_after_import_bytes"] > 50e6  # python + torch really were loaded
    assert rss["peak_rss_bytes"] >= rss["rss_after_load_bytes"] >= rss["rss_after_import_bytes"]


def test_peak_rss_reports_a_broken_variant(tmp_path) -> None:
    (tmp_path / "variant.json").write_text("{}")
    with pytest.raises(RuntimeError, match="child process failed"):
        peak_rss(tmp_path, 1, 8, 1)


def test_peak_rss_is_not_polluted_by_a_large_parent(tmp_path) -> None:
    save_variant(build_gpt("tiny", 256).eval(), tmp_path)
    ballast = torch.ones(150_000_000)  # 600 MB held by this (parent) process
    rss = peak_rss(tmp_path, batch_size=2, seq_len=32, threads=1)
    del ballast
    # The tiny model's own peak is far below the parent's size.
    assert rss["peak_rss_bytes"] < 550e6, rss
    assert rss["peak_rss_bytes"] - rss["rss_after_load_bytes"] < 100e6, rss


def test_runtime_libraries_are_loaded_only_when_the_variant_needs_them(tmp_path) -> None:
    model = build_gpt("tiny", 256).eval()
    imports = {}
    for stage in (None, "dynamic-int8", "int8"):
        m = model
        if stage:
            # dynamic-int8 on torch.ao: no library beyond torch (on torchao, torchao is loaded)
            settings = {"backend": "torch.ao"} if stage == "dynamic-int8" else {}
            cfg = REGISTRY[stage].config_cls(**settings)
            m, _ = run_stage(stage, copy.deepcopy(model), cfg, StageContext())
        save_variant(m, tmp_path / str(stage))
        imports[stage] = peak_rss(tmp_path / str(stage), 1, 8, 1)["rss_after_import_bytes"]
    # bitsandbytes (>100 MB resident) is imported for its own layers only.
    assert abs(imports["dynamic-int8"] - imports[None]) < 40e6, imports
    assert imports["int8"] - imports[None] > 60e6, imports
