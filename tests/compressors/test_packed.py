"""Packed int4/int8 layers (compress.compressors.packed): conventions, kernels, bytes, refusals.

Each layer is checked against its dequantized reference ``x @ dequant(W).T + b`` computed in
float32 here, so a wrong code, scale or zero convention, or a wrong layout, shows as an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress.compressors.packed import (
    PackedSpec,
    choose_qparams,
    dequantize,
    from_plain,
    pack_linear,
    quantize,
    quantize_linear,
)
from compress.errors import CompressError
from compress.evaluate.memory import count_zeros, module_weight_bytes, param_count

SPECS = [
    PackedSpec(4, 32, False, "float32"),
    PackedSpec(4, 64, True, "float32"),
    PackedSpec(4, None, False, "float32"),
    PackedSpec(8, None, True, "float32"),
    PackedSpec(4, 32, False, "bfloat16"),
    PackedSpec(4, 128, True, "bfloat16"),
    PackedSpec(8, None, True, "bfloat16"),
]


def _linear(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    with torch.no_grad():  # rows of very different magnitude, as in trained layers
        lin.weight.mul_(torch.logspace(-1, 1, out_features)[:, None])
    return lin


def _x(in_features: int, rows: int = 7) -> torch.Tensor:
    return torch.randn(2, rows, in_features, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_kernel_matches_the_dequantized_reference(spec) -> None:
    lin = _linear(48, 128)  # 48 rows: a partial block of the kernel's 32/64-row layout
    layer = quantize_linear(lin, spec)
    x = _x(128)
    ref = x @ layer.dequantize().T + lin.bias
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = (y - ref).abs().max() / ref.abs().max()
    # float32: the same arithmetic up to summation order; bfloat16 rounds activations,
    # outputs and group offsets to 8 significant bits.
    assert err < (1e-6 if spec.compute_dtype == "float32" else 1e-2), err
    # and the reference is the weights rounded to the nearest grid point: within half a step
    codes, scales, _ = layer.plain()
    step = scales.repeat_interleave(spec.group_size or 128, dim=1)
    assert torch.all((layer.dequantize() - lin.weight).abs() <= step / 2 + 1e-6)


def test_asymmetric_uint4_convention_by_hand() -> None:
    # w = (q - zero) * scale per group of 32 input columns, q and zero in [0, 15].
    spec = PackedSpec(4, 32, False, "float32")
    codes = torch.arange(16 * 64, dtype=torch.int16).remainder(16).view(16, 64)
    scales = torch.linspace(0.5, 2.0, 32).view(16, 2)
    zeros = torch.arange(32, dtype=torch.int16).remainder(16).view(16, 2)
    layer = pack_linear(codes, scales, zeros, spec)
    want = (codes.float() - zeros.float().repeat_interleave(32, 1)) * scales.repeat_interleave(
        32, 1
    )
    assert torch.equal(layer.dequantize(), want)
    x = torch.eye(64)  # the kernel's effective weights, column by column
    torch.testing.assert_close(layer(x), want.T, rtol=1e-6, atol=1e-6)  # offset rounded in fp32
    got_codes, got_scales, got_zeros = layer.plain()
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros)
    assert torch.equal(got_scales, scales)


def test_symmetric_conventions_by_hand() -> None:
    # 4-bit: signed q in [-8, 7], w = q * scale; 8-bit: q in [-128, 127], one scale per row.
    codes = torch.arange(16 * 64, dtype=torch.int16).remainder(16).view(16, 64) - 8
    scales = torch.full((16, 1), 0.25)
    layer = pack_linear(codes, scales, None, PackedSpec(4, 64, True, "float32"))
    torch.testing.assert_close(layer(torch.eye(64)), (codes.float() * 0.25).T, rtol=0, atol=0)
    codes8 = torch.arange(16 * 64, dtype=torch.int16).remainder(256).view(16, 64) - 128
    layer8 = pack_linear(codes8, scales, None, PackedSpec(8, None, True, "float32"))
    torch.testing.assert_close(layer8(torch.eye(64)), (codes8.float() * 0.25).T, rtol=0, atol=0)
    assert torch.equal(layer8.plain()[0], codes8)


@pytest.mark.parametrize("shape", [(16, 32), (48, 64), (272, 96), (1024, 256)])
def test_plain_form_round_trips_through_the_kernel_layout(shape) -> None:
    # 272 rows = 4 full 64-row blocks + 16, so every packing branch of the layout is used.
    out_features, in_features = shape
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.int16)
    scales = torch.rand(out_features, in_features // 32, generator=g) + 0.1
    zeros = torch.randint(0, 16, scales.shape, generator=g, dtype=torch.int16)
    spec = PackedSpec(4, 32, False, "bfloat16")
    layer = pack_linear(codes, scales, zeros, spec, torch.randn(out_features, generator=g))
    got_codes, got_scales, got_zeros = layer.plain()
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros)
    assert torch.equal(got_scales, scales.bfloat16().float())  # held in compute_dtype
    again = from_plain(layer.plain_tensors(), spec)
    assert torch.equal(again.qweight, layer.qweight) and torch.equal(again.qparams, layer.qparams)
    x = _x(in_features)
    with torch.inference_mode():
        assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_reload_from_plain_tensors_is_bit_identical(spec) -> None:
    layer = quantize_linear(_linear(64, 256), spec)
    again = from_plain({k: v.clone() for k, v in layer.plain_tensors().items()}, spec)
    x = _x(256, rows=33)
    with torch.inference_mode():
        assert torch.equal(layer(x), again(x))


def test_bytes_are_packed_codes_plus_scales_and_zeros() -> None:
    lin = _linear(1024, 256)
    fp32 = module_weight_bytes(lin)
    assert fp32 == (1024 * 256 + 1024) * 4
    int4 = quantize_linear(lin, PackedSpec(4, 128, False, "bfloat16"))
    # two codes per byte; a bf16 scale and a bf16 zero per 128 columns of each row; fp32 bias
    assert module_weight_bytes(int4) == 1024 * 256 // 2 + 2 * 1024 * 2 * 2 + 1024 * 4
    assert module_weight_bytes(int4) <= 0.3 * fp32
    assert sum(t.nbytes for t in int4.plain_tensors().values()) == sum(
        t.nbytes for t in int4.state_dict().values()
    )  # the portable form has the kernel's bytes exactly
    int4_32 = quantize_linear(lin, PackedSpec(4, 32, False, "bfloat16"))
    assert module_weight_bytes(int4_32) == 1024 * 128 + 2 * 1024 * 8 * 2 + 1024 * 4
    int8 = quantize_linear(lin, PackedSpec(8, None, True, "bfloat16"))
    assert module_weight_bytes(int8) == 1024 * 256 + 1024 * 2 + 1024 * 4
    for layer in (int4, int4_32, int8):
        assert param_count(layer) == param_count(lin) == 1024 * 256 + 1024


def test_pruned_zeros_stay_zero_codes_and_are_counted() -> None:
    lin = _linear(64, 128)
    with torch.no_grad():
        lin.weight[:, ::2] = 0  # half of every group pruned
    for spec in (PackedSpec(4, 64, False, "float32"), PackedSpec(4, 64, True, "bfloat16")):
        layer = quantize_linear(lin, spec)
        deq = layer.dequantize()
        assert torch.all(deq[:, ::2] == 0)
        zeros, total = count_zeros(nn.Sequential(layer))
        assert total == 64 * 128
        assert zeros == int((deq == 0).sum()) >= 64 * 64


def test_choose_qparams_and_quantize_are_round_to_nearest() -> None:
    spec = PackedSpec(4, 32, False, "float32")
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0] * 8] * 16)  # one group per row: min -1, max 2
    scales, zeros = choose_qparams(w, spec)
    assert torch.allclose(scales, torch.full((16, 1), 3.0 / 15))
    assert torch.equal(zeros, torch.full((16, 1), 5, dtype=torch.int16))  # round(1 / 0.2)
    codes = quantize(w, scales, zeros, spec)
    assert torch.equal(codes[0, :4], torch.tensor([0, 5, 8, 15], dtype=torch.int16))
    torch.testing.assert_close(dequantize(codes, scales, zeros, spec)[0, :4], w[0, :4].clone())
    # all-zero (pruned) groups get a valid grid and stay exactly zero
    scales, zeros = choose_qparams(torch.zeros(16, 64), spec)
    assert torch.all(scales > 0)
    assert torch.all(
        dequantize(quantize(torch.zeros(16, 64), scales, zeros, spec), scales, zeros, spec) == 0
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, "bits 3: packed CPU kernels exist for 4 and 8 bits"),
        ({"group_size": 16}, "group_size 16: the int4 kernel takes groups of 32, 64, 128, 256"),
        ({"bits": 8, "group_size": 64, "symmetric": True}, "set group_size: null"),
        ({"bits": 8, "group_size": None}, "is symmetric; set symmetric: true"),
        ({"compute_dtype": "float16"}, "compute_dtype 'float16': allowed: bfloat16, float32"),
    ],
)
def test_settings_without_a_kernel_are_refused_in_one_line(kwargs, match) -> None:
    with pytest.raises(CompressError, match=match) as info:
        PackedSpec(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "shape,spec,match",
    [
        ((40, 64), PackedSpec(4, 32), r"out_features to be a multiple of 16"),
        (
            (32, 96),
            PackedSpec(4, 64),
            r"not a multiple of group_size 64 \(group sizes that divide it: 32\)",
        ),
        ((32, 512), PackedSpec(4, None), r"one group of 512 columns"),
    ],
)
def test_shapes_without_a_kernel_are_refused_in_one_line(shape, spec, match) -> None:
    with pytest.raises(CompressError, match=match) as info:
        quantize_linear(_linear(*shape), spec, name="blocks.0.mlp.fc_in")
    assert str(info.value).startswith(f"blocks.0.mlp.fc_in ({shape[0]}x{shape[1]}): ")
    assert "\n" not in str(info.value)
    quantize_linear(_linear(*shape), PackedSpec(8, None, True))  # int8 takes any shape


def test_tensors_that_break_the_conventions_are_rejected() -> None:
    spec = PackedSpec(4, 32, False)
    codes = torch.zeros(16, 64, dtype=torch.int16)
    scales, zeros = torch.ones(16, 2), torch.zeros(16, 2, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_linear(codes + 16, scales, zeros, spec)
    with pytest.raises(ValueError, match="positive and finite"):
        pack_linear(codes, -scales, zeros, spec)
    with pytest.raises(ValueError, match="zeros: expected shape"):
        pack_linear(codes, scales, None, spec)
    with pytest.raises(ValueError, match=r"scales: expected shape \(16, 2\)"):
        pack_linear(codes, torch.ones(16, 1), zeros, spec)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_linear(codes.float(), scales, zeros, spec)


def test_layer_refuses_inputs_off_the_cpu() -> None:
    layer = quantize_linear(_linear(16, 32), PackedSpec(4, 32))
    with pytest.raises(RuntimeError, match="runs on the CPU only"):
        layer(torch.zeros(1, 32, device="meta"))
