"""AWQ-style scaling: never worse than round-to-nearest on the calibration inputs, clearly
better where a few input channels carry large activations, and real packed layers."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors.awq import awq, awq_scale
from compress.compressors.packed import (
    PackedLinear,
    PackedSpec,
    choose_qparams,
    dequantize,
    from_plain,
    pack_linear,
    quantize,
)
from compress.compressors.sequential import InputStats, output_error
from compress.data.calibration import CalibrationSpec

CALIB = CalibrationSpec(samples=16, seq_len=64)


def _stats(outliers: bool) -> tuple[torch.Tensor, InputStats]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2048, 256, generator=g)
    if outliers:  # a few channels 20x larger, as in trained transformers
        x[:, :8] *= 20
    st = InputStats(256)
    st.add(x)
    return w, st


def _rtn_error(w: torch.Tensor, st: InputStats, spec: PackedSpec) -> float:
    s, z = choose_qparams(w, spec)
    return output_error(w, dequantize(quantize(w, s, z, spec), s, z, spec), st.H)


@pytest.mark.parametrize(
    "bits, group, symmetric", [(4, 128, False), (4, 32, True), (8, None, True)]
)
def test_awq_beats_round_to_nearest_where_activations_have_outliers(bits, group, symmetric):
    w, st = _stats(outliers=True)
    spec = PackedSpec(bits, group, symmetric, "float32")
    fitted = awq(w, st, spec, grid=20)
    assert fitted.extra["awq_alpha"] > 0 and fitted.input_scale is not None
    layer = pack_linear(fitted.codes, fitted.scales, fitted.zeros, spec, None, fitted.input_scale)
    err = output_error(w, layer.dequantize(), st.H)
    assert err < 0.8 * _rtn_error(w, st, spec)
    # the kernel computes with the scaled input: x @ (dequant(W) * input_scale).T
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), rtol=1e-4, atol=1e-3)
    # the input scale is saved with the layer and read back
    again = from_plain(layer.plain_tensors(), spec)
    torch.testing.assert_close(again(x), layer(x))


def test_awq_is_never_worse_than_round_to_nearest():
    w, st = _stats(outliers=False)
    spec = PackedSpec(4, 64, False, "float32")
    fitted = awq(w, st, spec, grid=10)
    err = output_error(
        w,
        dequantize(fitted.codes, fitted.scales, fitted.zeros, spec)
        * (1 if fitted.input_scale is None else fitted.input_scale),
        st.H,
    )
    assert err <= _rtn_error(w, st, spec) + 1e-12


def test_scale_is_normalised_and_alpha_zero_is_one():
    m = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(awq_scale(m, 0.0), torch.ones(3))
    s = awq_scale(m, 0.5)
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0)
    assert s[2] > s[1] > s[0]


def test_tiny_model_every_layer_at_most_rtn_in_packed_int4_layers(tiny_workspace):
    ws = tiny_workspace
    cfg = REGISTRY["awq"].config_cls(bits=4, group_size=32)
    ctx = StageContext(seed=0, tokens=ws.tokens, calibration=CALIB)
    model, report = run_stage("awq", copy.deepcopy(ws.baseline).eval(), cfg, ctx)
    assert len(report.touched) == 12
    for t in report.touched:
        assert isinstance(model.get_submodule(t["module"]), PackedLinear)
        assert 0 < t["reconstruction_error"] <= t["rtn_error"] * (1 + 1e-6), t
    assert report.extra["reconstruction_error_mean"] < report.extra["rtn_error_mean"]
    assert report.touched_bytes_after <= 0.3 * report.touched_bytes_before
    x = ws.tokens["test"][:256].view(2, 128)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_an_awq_variant_saves_and_loads_with_its_input_scales(tiny_workspace, tmp_path):
    from compress.variant import load_variant, save_variant

    ws = tiny_workspace
    cfg = REGISTRY["awq"].config_cls(bits=4, group_size=64)
    ctx = StageContext(seed=0, tokens=ws.tokens, calibration=CALIB)
    model, report = run_stage("awq", copy.deepcopy(ws.baseline).eval(), cfg, ctx)
    assert report.extra["awq_layers_scaled"] > 0
    save_variant(model, tmp_path)
    again = load_variant(tmp_path)
    scaled = [n for n, m in again.named_modules() if getattr(m, "input_scale", None) is not None]
    assert len(scaled) == report.extra["awq_layers_scaled"]
    x = ws.tokens["test"][:256].view(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_clipping_search_lowers_the_error_of_heavy_tailed_weights():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    w[torch.rand(64, 256, generator=g) < 0.01] *= 12  # a few large weights stretch each grid
    x = torch.randn(2048, 256, generator=g)
    st = InputStats(256)
    st.add(x)
    spec = PackedSpec(4, 128, False, "float32")

    def error(f):
        new = dequantize(f.codes, f.scales, f.zeros, spec)
        return output_error(w, new if f.input_scale is None else new * f.input_scale, st.H)

    plain = awq(w, st, spec, grid=4, clip=False)
    clipped = awq(w, st, spec, grid=4, clip=True)
    assert clipped.extra["awq_clipped_groups"] > 0
    assert error(clipped) < 0.97 * error(plain)
