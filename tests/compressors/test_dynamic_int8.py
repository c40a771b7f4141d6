"""dynamic-int8 on its torch.ao fallback (torch/fbgemm dynamic quantization) on the trained
tiny baseline; the torchao backend is tested in test_dynamic_int8_torchao.py.

Quality, bytes and save/load are asserted numerically; speed is measured, not asserted (see
benchmarks/cpu_paths.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors.dynamic_int8 import linear_from_tensors, quantize_weight
from compress.errors import CompressError
from compress.evaluate.memory import (
    count_zeros,
    is_packed_linear,
    module_weight_bytes,
    packed_linear_tensors,
    param_count,
)
from compress.evaluate.perplexity import perplexity
from compress.models.gpt import build_gpt
from compress.variant import MANIFEST, WEIGHTS, load_variant, save_variant

STAGE = "dynamic-int8"


@pytest.fixture(scope="module")
def base(tiny_workspace):
    ws = tiny_workspace
    ids = ws.tokens["test"][:8192]
    ref = perplexity(ws.baseline, ids, 128).perplexity
    return ws, ids, ref


def _apply(model: nn.Module, **settings):
    cfg = REGISTRY[STAGE].config_cls(**{"backend": "torch.ao", **settings})
    return run_stage(STAGE, copy.deepcopy(model).eval(), cfg, StageContext(seed=0))


@pytest.fixture(scope="module")
def converted(base):
    ws, _, _ = base
    return _apply(ws.baseline)


def test_dynamic_int8_is_near_lossless_and_four_times_smaller(base, converted) -> None:
    ws, ids, ref = base
    model, report = converted
    ppl = perplexity(model, ids, 128).perplexity
    assert abs(ppl / ref - 1) < 0.01, (ppl, ref)
    assert report.touched_bytes_after / report.touched_bytes_before <= 0.3
    # Per output row: int8 codes, an fp32 scale and an int32 zero point (bias excluded).
    expected = 8 * sum(o * i + 8 * o for o, i in (t["shape"] for t in report.touched))
    expected /= sum(o * i for o, i in (t["shape"] for t in report.touched))
    assert report.extra["bits_per_weight"] == pytest.approx(expected)
    assert 8.0 < report.extra["bits_per_weight"] < 9.0
    assert "x86" in report.extra["backend"] or "fbgemm" in report.extra["backend"]
    assert len(report.touched) == 6 * ws.baseline.config.n_layer  # q, k, v, o, fc_in, fc_out
    assert report.weight_bytes_after < report.weight_bytes_before
    assert report.params_after == report.params_before == param_count(ws.baseline)


def test_per_tensor_scales_also_work(base) -> None:
    ws, ids, ref = base
    model, report = _apply(ws.baseline, per_channel=False)
    ppl = perplexity(model, ids, 128).perplexity
    assert abs(ppl / ref - 1) < 0.02, (ppl, ref)
    assert 8.0 < report.extra["bits_per_weight"] < 8.01  # one scale per matrix


def test_converted_layers_run_int8_kernels(base, converted) -> None:
    ws, ids, _ = base
    model, report = converted
    import torch.ao.nn.quantized.dynamic as nnqd

    for t in report.touched:
        layer = model.get_submodule(t["module"])
        assert isinstance(layer, nnqd.Linear) and is_packed_linear(layer)
        assert t["to"] == type(layer).__name__ == "DynamicInt8Linear"
        w, _ = layer._packed_params._weight_bias()
        assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine
    # No float nn.Linear is left in the blocks; the profiler sees the int8 GEMM op run.
    assert not any(isinstance(m, nn.Linear) for m in model.blocks.modules())
    with torch.autograd.profiler.profile() as prof, torch.inference_mode():
        model(ids[:128].view(1, 128))
    ops = {e.name for e in prof.function_events}
    assert "quantized::linear_dynamic" in ops
    assert "aten::addmm" not in ops  # only the tied fp32 LM head is a plain matmul


def test_weights_are_symmetric_int8_per_output_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.linspace(0.1, 4.0, 16)[:, None]
    codes, scale, zero_point = quantize_weight(w, per_channel=True)
    assert codes.dtype == torch.int8 and scale.shape == zero_point.shape == (16,)
    assert torch.equal(codes.abs().amax(dim=1), torch.full((16,), 127, dtype=torch.int8))
    assert torch.all(zero_point == 0)
    err = (codes.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)  # round to nearest
    # A pruned (all-zero) row stays exactly zero.
    codes, scale, _ = quantize_weight(torch.zeros(2, 8), per_channel=True)
    assert torch.all(codes == 0) and torch.all(scale > 0)


def test_bytes_of_one_layer_are_exact() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    q, report = _apply(model, ignore=[])
    # int8 codes, fp32 scale and int32 zero point per output row, fp32 bias.
    assert module_weight_bytes(q) == 64 * 32 + 32 * 4 + 32 * 4 + 32 * 4
    assert report.touched_bytes_before == (64 * 32 + 32) * 4
    assert report.touched_bytes_after == module_weight_bytes(q)
    assert report.extra["bits_per_weight"] == 8 + 64 / 64  # (2048 + 256 bytes) * 8 / 2048
    assert param_count(q) == 64 * 32 + 32
    q, _ = _apply(nn.Sequential(nn.Linear(64, 32, bias=False)), ignore=[], per_channel=False)
    assert module_weight_bytes(q) == 64 * 32 + 4 + 4


def test_bytes_of_a_torch_quantize_dynamic_model_are_counted() -> None:
    # A model quantized by torch itself (not by this stage; per-tensor by default) is counted
    # the same way: codes, one scale, one zero point, bias, then the LayerNorm's two vectors.
    import warnings

    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert is_packed_linear(q[0])
    assert module_weight_bytes(q) == 64 * 32 + 4 + 4 + 32 * 4 + 2 * 32 * 4


def test_skips_are_reported_with_reasons(base, converted) -> None:
    ws, _, _ = base
    _, report = converted
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    assert reasons["lm_head"] == "ignored by selector 'lm_head'"
    assert "Embedding" in reasons["tok_emb"] and "LayerNorm" in reasons["ln_f"]
    leaves = {
        n
        for n, m in ws.baseline.named_modules()
        if n and not list(m.children()) and list(m.parameters(recurse=False))
    }
    assert leaves == set(reasons) | {t["module"] for t in report.touched}
    _, report = _apply(ws.baseline, ignore=[])
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    assert reasons["lm_head"] == "weight tied to tok_emb"


def test_converting_only_already_quantized_layers_is_an_error(base) -> None:
    ws, _, _ = base
    model, _ = run_stage(
        "int8", copy.deepcopy(ws.baseline), REGISTRY["int8"].config_cls(), StageContext()
    )
    with pytest.raises(
        CompressError,
        match=r"^dynamic-int8: converts no layer \(every candidate was skipped: .*1x Linear8bitLt "
        r"weight is torch.int8, already quantized",
    ):
        _apply(model, targets=["blocks.0.attn.q_proj"])


def test_saves_as_plain_tensors_and_reloads_identically(base, converted, tmp_path) -> None:
    ws, ids, _ = base
    model, report = converted
    save_variant(model, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert set(manifest["quantized"]) == {t["module"] for t in report.touched}
    assert manifest["quantized"]["blocks.0.mlp.fc_in"] == {
        "kind": STAGE,
        "per_channel": True,
        "backend": "torch.ao",
    }
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        keys = {k for k in f.keys() if k.startswith("blocks.0.mlp.fc_in.")}
        assert f.get_slice("blocks.0.mlp.fc_in.weight").get_dtype() == "I8"
    assert keys == {
        f"blocks.0.mlp.fc_in.{k}" for k in ("weight", "weight_scale", "weight_zero_point", "bias")
    }
    again = load_variant(tmp_path)
    x = ids[:512].view(4, 128)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))
    assert [type(m) for m in model.modules()] == [type(m) for m in again.modules()]
    assert module_weight_bytes(again) == module_weight_bytes(model)
    assert again.lm_head.weight is again.tok_emb.weight


def test_per_tensor_variant_reloads_identically(tmp_path) -> None:
    model = build_gpt("tiny", 256).eval()
    q, _ = _apply(model, per_channel=False)
    save_variant(q, tmp_path)
    again = load_variant(tmp_path)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(q(x), again(x))


def test_plain_tensors_round_trip_through_a_layer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    q = linear_from_tensors(*quantize_weight(lin.weight, True), lin.bias.detach())
    again = linear_from_tensors(**packed_linear_tensors(q))
    x = torch.randn(3, 48)
    assert torch.equal(q(x), again(x))
    assert (q(x) - lin(x)).abs().max() < 0.05


def test_pruned_zeros_survive_and_are_counted() -> None:
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[:3] = 0
    q, _ = _apply(model, ignore=[])
    assert count_zeros(q) == (3 * 16, 8 * 16)


def test_dynamic_int8_is_deterministic(base) -> None:
    ws, ids, _ = base
    x = ids[:256].view(2, 128)
    a, _ = _apply(ws.baseline)
    b, _ = _apply(ws.baseline)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a(x), a(x))
    assert all(
        torch.equal(packed_linear_tensors(m)[k], packed_linear_tensors(n)[k])
        for m, n in zip(a.modules(), b.modules())
        if is_packed_linear(m)
        for k in ("weight", "weight_scale")
    )


def test_targets_select_a_subset(base) -> None:
    ws, _, _ = base
    _, report = _apply(ws.baseline, targets=["re:blocks\\.0\\.mlp\\..*"])
    assert sorted(t["module"] for t in report.touched) == [
        "blocks.0.mlp.fc_in",
        "blocks.0.mlp.fc_out",
    ]
    assert {"module": "blocks.1.mlp.fc_in", "reason": "not targeted"} in report.skipped


def test_packing_engine_is_pinned_and_the_global_setting_restored() -> None:
    supported = torch.backends.quantized.supported_engines
    if "onednn" not in supported or "x86" not in supported:
        pytest.skip("needs an x86 build with the onednn engine")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"  # would keep a second copy of every weight
    try:
        q, report = _apply(nn.Sequential(nn.Linear(16, 8)), ignore=[])
        assert torch.backends.quantized.engine == "onednn"
    finally:
        torch.backends.quantized.engine = previous
    assert "(x86 engine)" in report.extra["backend"]
    # fbgemm keeps only the packed weight and unpacks a fresh copy on request; onednn would
    # hand back the same stored (second) copy every time.
    packed = q[0]._packed_params
    assert packed._weight_bias()[0].data_ptr() != packed._weight_bias()[0].data_ptr()
