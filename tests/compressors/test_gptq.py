"""GPTQ: integer codes in packed kernel layers, and below round-to-nearest's error per layer."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors.gptq import gptq
from compress.compressors.packed import (
    PackedLinear,
    PackedSpec,
    choose_qparams,
    dequantize,
    pack_linear,
    quantize,
)
from compress.compressors.sequential import InputStats, output_error
from compress.data.calibration import CalibrationSpec
from compress.errors import CompressError
from compress.recipe import recipe_from_dict

CALIB = CalibrationSpec(samples=16, seq_len=64)


def _layer() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) @ (
        torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g)
    )
    st = InputStats(256)
    st.add(x)
    return w, st.H


@pytest.mark.parametrize(
    "bits, group, symmetric, act_order",
    [(4, 128, False, False), (4, 32, True, True), (4, 64, False, True), (8, None, True, False)],
)
def test_gptq_beats_round_to_nearest_on_the_same_grid(bits, group, symmetric, act_order) -> None:
    w, H = _layer()
    spec = PackedSpec(bits, group, symmetric, "float32")
    codes, scales, zeros = gptq(w, H, spec, blocksize=64, act_order=act_order)
    assert codes.shape == w.shape and codes.dtype == torch.int16
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    s, z = choose_qparams(w, spec)
    rtn = output_error(w, dequantize(quantize(w, s, z, spec), s, z, spec), H)
    assert output_error(w, dequantize(codes, scales, zeros, spec), H) < 0.75 * rtn
    # the packed kernel computes with exactly these codes and scales
    lin = pack_linear(codes, scales, zeros, spec)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    want = x @ dequantize(codes, scales, zeros, spec).t()
    torch.testing.assert_close(lin(x), want, rtol=1e-4, atol=1e-3)


def test_tiny_model_every_layer_below_rtn_in_packed_int4_layers(tiny_workspace) -> None:
    ws = tiny_workspace
    cfg = REGISTRY["gptq"].config_cls(bits=4, group_size=32)
    ctx = StageContext(seed=0, tokens=ws.tokens, calibration=CALIB)
    model, report = run_stage("gptq", copy.deepcopy(ws.baseline).eval(), cfg, ctx)
    assert len(report.touched) == 12  # 2 blocks x (q, k, v, o, fc_in, fc_out)
    for t in report.touched:
        assert isinstance(model.get_submodule(t["module"]), PackedLinear)
        assert 0 < t["reconstruction_error"] < t["rtn_error"], t
    assert report.touched_bytes_after <= 0.3 * report.touched_bytes_before
    x = ws.tokens["test"][:256].view(2, 128)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_settings_the_kernels_lack_are_refused_at_load() -> None:
    data = {"variants": [{"name": "g", "pipeline": [{"gptq": {"bits": 8, "group_size": 128}}]}]}
    with pytest.raises(CompressError, match=r"gptq: 8 bits: the int8 kernel .* set group_size"):
        recipe_from_dict(data, "r.yaml", "r")
    data["variants"][0]["pipeline"] = [{"gptq": {"group_size": 16}}]
    with pytest.raises(CompressError, match=r"pipeline\[0\]\.gptq\.group_size"):
        recipe_from_dict(data, "r.yaml", "r")


def test_needs_calibration_tokens(tiny_workspace) -> None:
    model = copy.deepcopy(tiny_workspace.baseline)
    cfg = REGISTRY["gptq"].config_cls(group_size=64)
    with pytest.raises(CompressError, match="gptq.calibration.split: no tokenized 'train' split"):
        run_stage("gptq", model, cfg, StageContext())
