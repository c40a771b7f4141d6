"""4-bit layers in bitsandbytes' packed AVX512-BF16 CPU layout (``cpu_kernel: auto``): the same
kernel and numbers as bitsandbytes' own fast path, and outputs that stay identical through
``state_dict()``, save and load (bitsandbytes' own path unpacks and re-quantizes on save)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.errors import CompressError
from compress.evaluate.memory import count_zeros, module_weight_bytes, param_count
from compress.models.gpt import build_gpt
from compress.variant import MANIFEST, load_variant, save_variant

bnb_cpu = pytest.importorskip("compress.compressors.bnb_cpu")
pytestmark = pytest.mark.skipif(
    not bnb_cpu.kernel_available(), reason="bitsandbytes' packed kernel needs AVX512-BF16"
)


def _apply(model: nn.Module, stage: str = "nf4", **settings):
    cfg = REGISTRY[stage].config_cls(**settings)
    return run_stage(stage, copy.deepcopy(model).eval(), cfg, StageContext(seed=0))


def _direct_bnb(lin: nn.Linear, quant_type: str = "nf4") -> nn.Module:
    """``bnb.nn.Linear4bit`` as its documentation makes one (its CPU fast path left on)."""
    from compress._bnb import import_bnb

    bnb = import_bnb()
    q = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type=quant_type
    )
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), False, quant_type=quant_type)
    q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu").eval()


@pytest.fixture(scope="module")
def model_and_x():
    torch.manual_seed(0)
    model = build_gpt("tiny", 256).eval()
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_layer_is_packed_and_computes_what_bitsandbytes_fast_path_does(quant_type) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    q, report = _apply(nn.Sequential(lin), quant_type, ignore=[])
    assert report.extra["cpu_kernel"] == {"packed_avx512bf16": 1, "plain": 0, "plain_because": {}}
    assert type(q[0]).__name__ == "CpuPacked4bitLinear" and q[0].support_avx512bf16_for_cpu
    x = torch.randn(5, 256)
    direct = _direct_bnb(lin, quant_type)
    with torch.inference_mode():
        want = direct(x)  # its first eval forward repacks for the bf16 kernel
        got = q(x)
    assert getattr(direct.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(got, want)
    assert (got - lin(x)).norm() / lin(x).norm() < 0.15  # 4-bit, but a working layer


def test_outputs_are_identical_after_state_dict_save_and_load(model_and_x, tmp_path) -> None:
    model, x = model_and_x
    q, _ = _apply(model)
    with torch.inference_mode():
        before = q(x)
    q.state_dict()  # bitsandbytes' own Linear4bit re-quantizes here
    with torch.inference_mode():
        assert torch.equal(q(x), before)
    for cycle in range(2):  # a reloaded variant saved again is still the same
        save_variant(q, tmp_path / str(cycle))
        q = load_variant(tmp_path / str(cycle))
        with torch.inference_mode():
            assert torch.equal(q(x), before), cycle
    spec = json.loads((tmp_path / "1" / MANIFEST).read_text())["quantized"]["blocks.0.mlp.fc_in"]
    assert spec["layout"] == "avx512bf16" and spec["kind"] == "nf4"
    assert type(q.get_submodule("blocks.0.mlp.fc_in")).__name__ == "CpuPacked4bitLinear"


def test_bytes_are_the_kernel_tensors() -> None:
    model = nn.Sequential(nn.Linear(1024, 1024))
    q, report = _apply(model, ignore=[])
    # codes 4 bits/weight, one bf16 absmax per 64 weights, the 16-entry fp32 code book, bias
    want = 1024 * 1024 // 2 + 1024 * 1024 // 64 * 2 + 16 * 4 + 1024 * 4
    assert module_weight_bytes(q) == report.touched_bytes_after == want
    assert 4.24 < report.extra["bits_per_weight"] < 4.26
    assert param_count(q) == param_count(model)


def test_a_cpu_without_the_kernel_loads_the_same_weights_plain(
    model_and_x, monkeypatch, tmp_path
) -> None:
    model, x = model_and_x
    q, _ = _apply(model)
    save_variant(q, tmp_path)
    monkeypatch.setattr(bnb_cpu, "kernel_available", lambda: False)
    plain = load_variant(tmp_path)
    import bitsandbytes.functional as F

    for name, layer in plain.named_modules():
        if type(layer).__name__ != "Linear4bit":
            continue
        packed = q.get_submodule(name)
        qs = packed.weight.quant_state
        want = qs.code[packed.codes().long()] * qs.absmax.t().float().repeat_interleave(
            qs.blocksize, dim=1
        )
        assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), want)
    with torch.inference_mode():
        want, got = q(x), plain(x)
    assert (got - want).norm() / want.norm() < 0.01  # bf16 kernel vs fp32 kernel


def test_layers_the_kernel_cannot_take_stay_plain_and_say_why() -> None:
    # (not run: the second layer is only there to be converted)
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(64, 64))  # 40 rows: not a multiple of 32
    q, report = _apply(model, ignore=[])
    assert report.extra["cpu_kernel"]["packed_avx512bf16"] == 1
    assert report.extra["cpu_kernel"]["plain_because"] == {
        "out_features 40 is not a multiple of 32": 1
    }
    assert type(q[0]).__name__ == "Linear4bit" and not q[0].support_avx512bf16_for_cpu
    with pytest.raises(CompressError, match=r"^nf4.cpu_kernel: packed, but 1 layers"):
        _apply(model, ignore=[], cpu_kernel="packed")


def test_pruned_weights_are_counted_as_zeros() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight[:3] = 0
    q, _ = _apply(model, ignore=[])
    zeros, total = count_zeros(q)
    assert total == 64 * 32 and zeros >= 3 * 64
    assert zeros == int((q[0].weight.quant_state.code[q[0].codes().long()] == 0).sum())
