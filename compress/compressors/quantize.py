"""Weight quantization with bitsandbytes: ``int8`` (LLM.int8()), ``nf4`` and ``fp4``.

``int8`` replaces each targeted ``nn.Linear`` with ``bnb.nn.Linear8bitLt`` (row-wise absmax int8
weights plus one fp32 scale per output row; activation columns above ``threshold`` take an
fp16 outlier path). ``nf4``/``fp4`` use ``bnb.nn.Linear4bit``: two 4-bit codes per byte, one
absmax per ``blocksize`` weights, optionally itself quantized to 8 bits (``double_quant``).

4-bit layers on a CPU with AVX512-BF16 run bitsandbytes' packed bf16 kernel by default
(``cpu_kernel: auto``): each layer is packed for it when it is made and stays packed through
save and load (:mod:`compress.compressors.bnb_cpu`), so outputs do not change after a save. That
kernel computes in bfloat16 and holds bf16 absmax (16 bits per block; double quantization is
not kept). ``cpu_kernel: plain`` keeps bitsandbytes' plain layout and portable kernel, exact in
``compute_dtype``; layers the packed kernel cannot take (shape), a CPU without AVX512-BF16 and
a model on another device get the plain layout under ``auto`` too. The report's
``extra["cpu_kernel"]`` counts the layers of each layout and says why any is plain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from compress._bnb import import_bnb
from compress.compressors.base import StageConfig, StageContext, StageReport, register
from compress.compressors.targets import nothing_selected, select_modules, set_module
from compress.errors import CompressError
from compress.evaluate.memory import module_weight_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Int8Config(StageConfig):
    threshold: float = Field(6.0, ge=0.0, description="outlier threshold; 0 disables it")
    targets: list[str] | None = None
    ignore: list[str] = ["lm_head"]


class FourBitConfig(StageConfig):
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = True
    # auto: bitsandbytes' packed AVX512-BF16 CPU kernel where it runs, else plain (see above)
    cpu_kernel: Literal["auto", "packed", "plain"] = "auto"
    targets: list[str] | None = None
    ignore: list[str] = ["lm_head"]


def make_int8_linear(lin: nn.Linear, threshold: float) -> nn.Module:
    bnb = import_bnb()
    q = bnb.nn.Linear8bitLt(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    device = lin.weight.device
    q.weight = bnb.nn.Int8Params(
        lin.weight.detach().to("cpu", torch.float32).clone(),
        requires_grad=False,
        has_fp16_weights=False,
    )
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone().cpu(), requires_grad=False)
    # Moving a float Int8Params to a device quantizes it (on the CPU or the layer's GPU).
    # bitsandbytes picks its kernels by train/eval mode, so the new layer takes the mode of
    # the one it replaces.
    return q.to(device).train(lin.training)


def make_4bit_linear(
    lin: nn.Linear, quant_type: str, compute_dtype: str, blocksize: int, double_quant: bool
) -> nn.Module:
    bnb = import_bnb()
    q = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=DTYPES[compute_dtype],
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    device = lin.weight.device
    q.weight = bnb.nn.Params4bit(
        lin.weight.detach().to("cpu", torch.float32).clone(),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        blocksize=blocksize,
    )
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone().cpu(), requires_grad=False)
    keep_plain_layout(q)
    return q.to(device).train(lin.training)


def keep_plain_layout(q: nn.Module) -> None:
    """Stop bitsandbytes from repacking a plain ``Linear4bit`` at its first forward pass.

    On CPUs with AVX512-BF16, ``Linear4bit`` in eval mode repacks its weights for a bf16 kernel,
    and every ``state_dict()`` unpacks them again with a slightly different quantization of the
    absmax, so outputs drift after a save. The packed layout is offered instead by
    :mod:`compress.compressors.bnb_cpu`, which keeps it through save and load.
    """
    if hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = False


def packed_kernel_problem(lin: nn.Linear, cfg: FourBitConfig) -> str:
    """Why ``lin`` does not get the packed CPU kernel under ``cfg`` ('' when it does)."""
    if cfg.cpu_kernel == "plain":
        return "cpu_kernel: plain"
    if lin.weight.device.type != "cpu":
        return f"on {lin.weight.device.type}: the packed kernel runs on the CPU only"
    from compress.compressors import bnb_cpu

    if not bnb_cpu.kernel_available():
        return "this CPU has no AVX512-BF16"
    return bnb_cpu.shape_problem(lin.out_features, lin.in_features, cfg.blocksize)


def make_4bit_layer(
    lin: nn.Linear, quant_type: str, cfg: FourBitConfig, why_plain: dict
) -> nn.Module:
    """A 4-bit layer for ``lin``: packed for the CPU kernel when it can be (see the module
    docstring), else plain; the reason a layer is plain goes into ``why_plain``."""
    q = make_4bit_linear(lin, quant_type, cfg.compute_dtype, cfg.blocksize, cfg.double_quant)
    problem = packed_kernel_problem(lin, cfg)
    if not problem:
        from compress.compressors import bnb_cpu

        return bnb_cpu.pack(q)
    why_plain[problem] = why_plain.get(problem, 0) + 1
    return q


def convert_linears(
    model: nn.Module,
    selected: list[tuple[str, nn.Module]],
    make: Callable[[nn.Linear], nn.Module],
    spec: dict,
    report: StageReport,
) -> None:
    """Replace each selected linear layer by ``make(layer)`` and account for it in ``report``.

    Shared by every weight quantizer: a layer whose weight is no longer floating point (already
    quantized by an earlier stage) is skipped with its reason; converting no layer at all is
    an error (:func:`nothing_selected`), never an empty "ok" stage; touched layers are listed with
    their bytes before and after, and ``extra["bits_per_weight"]`` gives the bits per weight of
    the converted matrices, codes plus scales/absmax/maps, biases excluded.
    """
    weights = bias_bytes = 0
    for name, lin in selected:
        if not lin.weight.is_floating_point():
            reason = f"{type(lin).__name__} weight is {lin.weight.dtype}, already quantized"
            report.skipped.append({"module": name, "reason": reason})
            continue
        before = module_weight_bytes(lin)
        q = make(lin)
        set_module(model, name, q)
        after = module_weight_bytes(q)
        report.touched.append(
            {
                "module": name,
                "from": type(lin).__name__,
                "to": type(q).__name__,
                "shape": [lin.out_features, lin.in_features],
                "bytes_before": before,
                "bytes_after": after,
                "quant": spec,
            }
        )
        report.touched_bytes_before += before
        report.touched_bytes_after += after
        weights += lin.out_features * lin.in_features
        bias_bytes += lin.bias.nbytes if lin.bias is not None else 0  # stays fp32 when converted
    if not report.touched:
        raise nothing_selected(report.stage, report.skipped)
    report.extra["bits_per_weight"] = 8 * (report.touched_bytes_after - bias_bytes) / weights


def _convert(
    model: nn.Module, stage: str, cfg: Int8Config | FourBitConfig, make, spec: dict
) -> tuple[nn.Module, StageReport]:
    sel = select_modules(model, (nn.Linear,), cfg.targets, cfg.ignore, stage=stage)
    report = StageReport(stage=stage, config=cfg.model_dump(), skipped=sel.skipped)
    convert_linears(model, sel.selected, make, spec, report)
    return model, report


@register("int8", Int8Config)
def apply_int8(
    model: nn.Module, cfg: Int8Config, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """bitsandbytes LLM.int8(): int8 weights with per-row scales and an fp16 outlier path."""
    spec = {"kind": "int8", "threshold": cfg.threshold}
    return _convert(model, "int8", cfg, lambda lin: make_int8_linear(lin, cfg.threshold), spec)


def _four_bit(quant_type: str):
    def apply(
        model: nn.Module, cfg: FourBitConfig, ctx: StageContext
    ) -> tuple[nn.Module, StageReport]:
        spec = {
            "kind": quant_type,
            "compute_dtype": cfg.compute_dtype,
            "blocksize": cfg.blocksize,
            "double_quant": cfg.double_quant,
        }
        if cfg.cpu_kernel == "packed":
            from compress.compressors import bnb_cpu

            if not bnb_cpu.kernel_available():
                raise CompressError(
                    f"{quant_type}.cpu_kernel: packed needs a CPU with AVX512-BF16, which this "
                    "one lacks; allowed here: auto, plain"
                )
        why_plain: dict[str, int] = {}
        make = lambda lin: make_4bit_layer(lin, quant_type, cfg, why_plain)  # noqa: E731
        model, report = _convert(model, quant_type, cfg, make, spec)
        packed = sum(t["to"] == "CpuPacked4bitLinear" for t in report.touched)
        if cfg.cpu_kernel == "packed" and why_plain:
            raise CompressError(
                f"{quant_type}.cpu_kernel: packed, but {sum(why_plain.values())} layers cannot "
                f"take it ({'; '.join(why_plain)}); use cpu_kernel: auto"
            )
        report.extra["cpu_kernel"] = {
            "packed_avx512bf16": packed,
            "plain": len(report.touched) - packed,
            "plain_because": why_plain,
        }
        return model, report

    apply.__doc__ = f"bitsandbytes 4-bit ({quant_type}) weights with blockwise absmax scales."
    return apply


register("nf4", FourBitConfig)(_four_bit("nf4"))
register("fp4", FourBitConfig)(_four_bit("fp4"))
