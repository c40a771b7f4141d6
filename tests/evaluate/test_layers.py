"""Per-layer sparsity and bits per weight, read from the model as stored."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.evaluate.layers import layer_stats
from compress.evaluate.memory import count_zeros
from compress.models.gpt import GPT, PRESETS, GPTConfig


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    return GPT(GPTConfig(**cfg) if isinstance(cfg, dict) else cfg).eval()


def test_float_model_is_dense_at_32_bits(model) -> None:
    layers = layer_stats(model)
    assert layers and all(r["bits_per_weight"] == 32.0 for r in layers)
    assert all(r["sparsity"] == 0.0 for r in layers)
    assert sum(r["weights"] for r in layers) == count_zeros(model)[1]


def test_pruned_layers_and_quantized_bits(model) -> None:
    cfg = REGISTRY["prune"].config_cls(sparsity=0.5)
    pruned, _ = run_stage("prune", copy.deepcopy(model), cfg, StageContext())
    layers = layer_stats(pruned)
    zeros, total = count_zeros(pruned)
    assert sum(r["zeros"] for r in layers) == zeros
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in layers)
    quant, _ = run_stage(
        "dynamic-int8", pruned, REGISTRY["dynamic-int8"].config_cls(), StageContext()
    )
    bits = [r["bits_per_weight"] for r in layer_stats(quant)]
    # int8 codes plus a per-channel scale and zero point: a little over 8 bits
    assert all(8.0 < b < 10.0 for b in bits), bits
    assert all(r["sparsity"] >= 0.5 for r in layer_stats(quant))
