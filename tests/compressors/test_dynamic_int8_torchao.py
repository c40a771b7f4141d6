"""dynamic-int8 on torchao (Int8DynamicActivationInt8WeightConfig), and its fallback to torch.ao
when torchao cannot be imported. Quality, bytes and save/load are asserted numerically."""

from __future__ import annotations

import builtins
import copy
import json

import pytest
import torch
import torch.nn as nn

from compress.compile import compile_seconds, is_compiled
from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors import int8_torchao as ao
from compress.errors import CompressError
from compress.evaluate.memory import count_zeros, module_weight_bytes, param_count
from compress.evaluate.perplexity import perplexity
from compress.models.gpt import build_gpt
from compress.variant import MANIFEST, load_variant, save_variant

pytest.importorskip("torchao")

STAGE = "dynamic-int8"


def _apply(model: nn.Module, **settings):
    cfg = REGISTRY[STAGE].config_cls(**settings)
    return run_stage(STAGE, copy.deepcopy(model).eval(), cfg, StageContext(seed=0))


@pytest.fixture(scope="module")
def base(tiny_workspace):
    ws = tiny_workspace
    ids = ws.tokens["test"][:8192]
    return ws, ids, perplexity(ws.baseline, ids, 128).perplexity


@pytest.fixture(scope="module")
def converted(base):
    ws, _, _ = base
    return _apply(ws.baseline, compile=False)


def test_every_target_linear_is_a_torchao_int8_layer(base, converted) -> None:
    ws, _, _ = base
    model, report = converted
    assert report.extra["backend_name"] == "torchao"
    assert report.extra["backend"].startswith("torchao ") and "(eager)" in report.extra["backend"]
    assert len(report.touched) == 6 * ws.baseline.config.n_layer  # q, k, v, o, fc_in, fc_out
    for t in report.touched:
        layer = model.get_submodule(t["module"])
        assert isinstance(layer, ao.TorchaoInt8Linear) and t["to"] == "TorchaoInt8Linear"
        assert type(layer.weight).__name__ == "Int8Tensor"
        assert layer.weight.qdata.dtype == torch.int8
        assert layer.weight.act_quant_kwargs is not None  # activations quantized too
    # No float nn.Linear is left in the blocks.
    assert not any(type(m) is nn.Linear for m in model.blocks.modules())


def test_outputs_are_close_to_fp32_and_perplexity_near_lossless(base, converted) -> None:
    ws, ids, ref = base
    model, _ = converted
    x = ids[:256].view(2, 128)
    with torch.inference_mode():
        want, got = ws.baseline(x), model(x)
    # Relative error of the logits: int8 weights and per-token int8 activations.
    assert (got - want).norm() / want.norm() < 0.02
    assert abs(perplexity(model, ids, 128).perplexity / ref - 1) < 0.01


def test_the_int8_gemm_runs(base, converted) -> None:
    _, ids, _ = base
    model, _ = converted
    with torch.autograd.profiler.profile() as prof, torch.inference_mode():
        model(ids[:128].view(1, 128))
    assert "aten::_int_mm" in {e.name for e in prof.function_events}


def test_bytes_are_the_stored_tensors() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    q, report = _apply(model, ignore=[], compile=False)
    # int8 codes, an fp32 scale and an int8 zero point per output row, fp32 bias.
    assert module_weight_bytes(q) == 64 * 32 + 32 * 4 + 32 * 1 + 32 * 4
    assert report.touched_bytes_after == module_weight_bytes(q)
    assert report.extra["bits_per_weight"] == 8 + 8 * (32 * 5) / (64 * 32)
    assert param_count(q) == param_count(model) == 64 * 32 + 32
    q, _ = _apply(nn.Sequential(nn.Linear(64, 32, bias=False)), ignore=[], per_channel=False)
    assert module_weight_bytes(q) == 64 * 32 + 4 + 1


def test_pruned_zeros_survive_and_are_counted() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        # weights well away from 0 (a random one below half a quantization step would round
        # to a zero code too), then three rows pruned
        w = model[0].weight
        w.copy_(torch.sign(torch.randn_like(w)) * (0.5 + 0.5 * torch.rand_like(w)))
        w[:3] = 0
    q, _ = _apply(model, ignore=[], compile=False)
    assert count_zeros(q) == (3 * 16, 8 * 16)


@pytest.mark.parametrize("per_channel", [True, False])
def test_saves_and_reloads_identically(per_channel, tmp_path) -> None:
    model = build_gpt("tiny", 256).eval()
    q, report = _apply(model, per_channel=per_channel, compile=False)
    save_variant(q, tmp_path)
    spec = json.loads((tmp_path / MANIFEST).read_text())["quantized"]["blocks.0.mlp.fc_in"]
    assert spec == {
        "kind": STAGE,
        "per_channel": per_channel,
        "backend": "torchao",
        "compile": False,
    }
    again = load_variant(tmp_path)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(q(x), again(x))
    assert [type(m) for m in q.modules()] == [type(m) for m in again.modules()]
    assert module_weight_bytes(again) == module_weight_bytes(q)


def test_a_torchao_variant_loads_on_torch_ao_without_torchao(monkeypatch, tmp_path) -> None:
    model = build_gpt("tiny", 256).eval()
    q, _ = _apply(model, compile=False)
    save_variant(q, tmp_path)
    monkeypatch.setattr(ao, "import_torchao", lambda: None)
    again = load_variant(tmp_path)
    layer = again.get_submodule("blocks.0.mlp.fc_in")
    assert type(layer).__name__ == "DynamicInt8Linear"
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = q(x), again(x)
    assert (got - want).norm() / want.norm() < 0.02  # same weights, activations quantized apart


def _hide_torchao(monkeypatch) -> None:
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "torchao" or name.startswith("torchao."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_falls_back_to_torch_ao_when_torchao_cannot_be_imported(monkeypatch) -> None:
    _hide_torchao(monkeypatch)
    assert ao.import_torchao() is None
    model = build_gpt("tiny", 256).eval()
    q, report = _apply(model)
    assert report.extra["backend_name"] == "torch.ao" and not report.extra["compiled"]
    assert "torch.ao dynamic quantized Linear" in report.extra["backend"]
    assert {t["to"] for t in report.touched} == {"DynamicInt8Linear"}
    assert not is_compiled(q)
    with pytest.raises(CompressError, match=r"^dynamic-int8.backend: torchao is not installed"):
        _apply(model, backend="torchao")


@pytest.mark.slow
def test_compiled_model_matches_eager_and_reloads_compiled(compiling, tmp_path) -> None:
    model = build_gpt("tiny", 256).eval()
    q, report = _apply(model)
    eager, _ = _apply(model, compile=False)
    assert report.extra["compiled"] and is_compiled(q)
    assert "torch.compile" in report.extra["backend"]
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = q(x), eager(x)
    assert compile_seconds(q) is not None
    # Fused, the activation scales round differently: a few values land one int8 step apart.
    assert (got - want).norm() / want.norm() < 0.01
    save_variant(q, tmp_path)
    again = load_variant(tmp_path)
    assert is_compiled(again) and not is_compiled(load_variant(tmp_path, compile=False))
    with torch.inference_mode():
        assert torch.equal(again(x), got)
