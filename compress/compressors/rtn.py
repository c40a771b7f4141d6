"""Round-to-nearest weight-only quantization on packed CPU kernels: ``rtn``.

Each targeted ``nn.Linear`` becomes a :class:`~compress.compressors.packed.PackedLinear`: its
weights rounded to the nearest point of a min-max grid per group of ``group_size`` input
columns (4 bits, asymmetric by default) or per output row (8 bits, symmetric), computed by
torch's packed int4/int8 CPU kernels. It is the baseline an error-minimising quantizer (GPTQ,
AWQ) must beat on the same kernels, and it keeps weights at ~4.25-5 bits (4-bit) in memory.

Settings the kernels do not have (3 bits, group size 16, asymmetric 8-bit, a GPU) are refused
when the recipe is loaded or the stage starts, with what is allowed; a layer whose shape the
kernel cannot take is an error naming it (leave it out with ``ignore``), never a silent skip.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import model_validator

from compress.compressors.base import StageConfig, StageContext, StageReport, register
from compress.compressors.packed import PackedSpec, quantize_linear, shape_problem, spec_problem
from compress.compressors.quantize import convert_linears
from compress.compressors.targets import select_modules
from compress.errors import CompressError
from compress.models.adapter import model_device

KIND = "rtn"


class RTNConfig(StageConfig):
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128, 256] | None = 128  # null: one group per output row
    symmetric: bool = False
    # bfloat16: the vectorized kernels on x86; float32: exact, scalar on x86 (see packed.py)
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    targets: list[str] | None = None
    ignore: list[str] = ["lm_head"]

    @model_validator(mode="after")
    def _kernel_exists(self) -> RTNConfig:
        problem = spec_problem(self.bits, self.group_size, self.symmetric, self.compute_dtype)
        if problem:
            raise ValueError(problem)
        return self

    def spec(self) -> PackedSpec:
        return PackedSpec(self.bits, self.group_size, self.symmetric, self.compute_dtype)


@register(KIND, RTNConfig)
def apply_rtn(model: nn.Module, cfg: RTNConfig, ctx: StageContext) -> tuple[nn.Module, StageReport]:
    """Round-to-nearest int4/int8 weights (per-group scales) on packed CPU kernels."""
    device = model_device(model)
    if device.type != "cpu":
        raise CompressError(
            f"{KIND}: the packed int4/int8 kernels run on the CPU only; on {device} use nf4 or int8"
        )
    spec = cfg.spec()
    sel = select_modules(model, (nn.Linear,), cfg.targets, cfg.ignore, stage=KIND)
    for name, lin in sel.selected:  # refuse before converting anything
        if problem := shape_problem(spec, lin.out_features, lin.in_features):
            raise CompressError(f"{KIND}: {name} ({lin.out_features}x{lin.in_features}): {problem}")
    report = StageReport(stage=KIND, config=cfg.model_dump(), skipped=sel.skipped)
    convert_linears(
        model,
        sel.selected,
        lambda lin: quantize_linear(lin, spec),
        {"kind": KIND, **spec.to_dict()},
        report,
    )
    report.extra["backend"] = (
        "torch _weight_int4pack_mm_for_cpu" if spec.bits == 4 else "torch _weight_int8pack_mm"
    ) + f" ({spec.compute_dtype})"
    return model, report
