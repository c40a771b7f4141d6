"""GPTQ (Frantar et al., 2023): weight-only int4/int8 quantization that corrects the rounding
error of each column on the columns not yet quantized, stored in packed CPU-kernel layers.

With ``H = X X^T`` of the layer's calibration inputs (plus ``damp`` times its mean diagonal)
and ``U`` the upper Cholesky factor of ``H^-1``, the columns are quantized left to right in
blocks of ``blocksize``; each column's error ``(w - q) / U_jj`` is spread over the remaining
columns of its block through row ``j`` of ``U``, and once per block onto all later columns.
``act_order`` visits columns by decreasing ``H_jj`` (largest activations first). Follows the
authors' reference ``GPTQ.fasterquant``.

The grid is the one the packed kernels compute with (:mod:`compress.compressors.packed`):
min-max scales (and zero points when asymmetric) per group of ``group_size`` consecutive input
columns, chosen when the quantization reaches a group, from its weights as updated so far; with
``act_order`` the groups stay contiguous in the original column order (the kernel has no column
permutation), so their scales are chosen up front from the original weights (the reference's
``static_groups``), as are the per-row scales of ``group_size: null``. The result is a
:class:`~compress.compressors.packed.PackedLinear` holding integer codes: nothing is
fake-quantized.

Each layer reports its output error ``||WX - W'X||^2 / ||WX||^2`` on its calibration inputs,
and the error round-to-nearest (the ``rtn`` stage's grid) gets on the same inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn
from pydantic import Field

from compress.compressors.base import StageContext, StageReport, register
from compress.compressors.packed import (
    PackedSpec,
    choose_qparams,
    dequantize,
    pack_linear,
    quantize,
    shape_problem,
)
from compress.compressors.quantize import convert_linears
from compress.compressors.rtn import RTNConfig
from compress.compressors.sequential import InputStats, block_linears, output_error, run_sequential
from compress.compressors.sparsegpt import inverse_hessian_factor
from compress.compressors.targets import select_modules
from compress.data.calibration import (
    CalibrationSpec,
    calibration_windows,
    merge,
    resolve_seq_len,
)
from compress.errors import CompressError
from compress.models.adapter import BlockLayout, LayoutError, adapter_for, model_device

KIND = "gptq"
BATCH_SIZE = 8


class GPTQConfig(RTNConfig):
    """The ``rtn`` settings (the same kernels and grids) plus GPTQ's own."""

    act_order: bool = False  # quantize columns by decreasing activation energy
    blocksize: int = Field(128, ge=1, description="columns updated together")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="Hessian dampening")
    calibration: CalibrationSpec | None = None  # overrides keys of the recipe's calibration


Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _row_spec(spec: PackedSpec) -> PackedSpec:
    """The same grid with one group per row: used on one group's columns at a time."""
    return dataclasses.replace(spec, group_size=None)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: PackedSpec,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> Quantized:
    """``(codes, scales, zeros)`` of ``weight`` (out, in) in the plain form
    :func:`~compress.compressors.packed.pack_linear` takes, given ``H = sum x x^T``."""
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    group = spec.group_size or cols
    groups = cols // group
    row_spec = _row_spec(spec)
    scales = torch.zeros(rows, groups)
    zeros = None if spec.symmetric else torch.zeros(rows, groups, dtype=torch.int16)
    perm = torch.arange(cols)
    static = act_order or spec.group_size is None
    if static:  # every group's grid up front, from the original weights
        for g in range(groups):
            s, z = choose_qparams(W[:, g * group : (g + 1) * group], row_spec)
            scales[:, g] = s[:, 0]
            if zeros is not None and z is not None:
                zeros[:, g] = z[:, 0]
    elif blocksize % group:  # a block holds whole groups
        blocksize = max(group, blocksize - blocksize % group)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp)
    Q = torch.zeros(rows, cols, dtype=torch.int16)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % group == 0:  # the group starts: its grid, from W so far
                s, z = choose_qparams(W1[:, i : i + group], row_spec)
                scales[:, col // group] = s[:, 0]
                if zeros is not None and z is not None:
                    zeros[:, col // group] = z[:, 0]
            g = int(perm[col]) // group
            s_g = scales[:, g : g + 1]
            z_g = None if zeros is None else zeros[:, g : g + 1]
            w = W1[:, i : i + 1]
            code = quantize(w, s_g, z_g, row_spec)  # (out, 1)
            q = dequantize(code, s_g, z_g, row_spec)
            Q[:, col] = code[:, 0]
            err = (w - q)[:, 0] / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes, scales, zeros


def _rtn(weight: torch.Tensor, spec: PackedSpec) -> torch.Tensor:
    """Round-to-nearest weights on the same kernel grid (the ``rtn`` stage's)."""
    scales, zeros = choose_qparams(weight, spec)
    return dequantize(quantize(weight, scales, zeros, spec), scales, zeros, spec)


@register(KIND, GPTQConfig)
def apply_gptq(
    model: nn.Module, cfg: GPTQConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """GPTQ int4/int8 weights fitted to calibration activations, on packed CPU kernels."""

    def fit(w: torch.Tensor, st: InputStats, spec: PackedSpec) -> Fitted:
        codes, scales, zeros = gptq(w, st.H, spec, cfg.blocksize, cfg.damp, cfg.act_order)
        return Fitted(codes, scales, zeros)

    return calibrated_packed(model, cfg, ctx, KIND, fit)


@dataclasses.dataclass
class Fitted:
    """One layer's result: plain codes, scales, zeros (see :mod:`~compress.compressors.packed`)
    and the input scale the layer multiplies its input by, if any."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    input_scale: torch.Tensor | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # per-layer facts for the report


def calibrated_packed(
    model: nn.Module,
    cfg: RTNConfig,
    ctx: StageContext,
    kind: str,
    fit: Callable[[torch.Tensor, InputStats, PackedSpec], Fitted],
) -> tuple[nn.Module, StageReport]:
    """The calibrated weight-only stages (GPTQ, AWQ): every targeted block linear layer is
    fitted by ``fit`` on its calibration inputs, block by block, and becomes a packed layer;
    each reports its output error and round-to-nearest's on the same inputs."""
    device = model_device(model)
    if device.type != "cpu":
        raise CompressError(
            f"{kind}: the packed int4/int8 kernels run on the CPU only, not {device}"
        )
    try:
        layout = adapter_for(model).layout(model)
    except LayoutError as exc:
        raise CompressError(f"{kind}: {exc}") from None
    spec = cfg.spec()
    sel = select_modules(model, (nn.Linear,), cfg.targets, cfg.ignore, stage=kind)
    for name, lin in sel.selected:  # refuse before any work
        if problem := shape_problem(spec, lin.out_features, lin.in_features):
            raise CompressError(f"{kind}: {name} ({lin.out_features}x{lin.in_features}): {problem}")
    by_block, outside = block_linears(layout, [n for n, _ in sel.selected])
    if outside:
        raise CompressError(
            f"{kind}.targets: {outside[0]} is in no transformer block; {kind} quantizes the "
            "blocks' linear layers only (leave it out with ignore)"
        )
    calib = merge(ctx.calibration, getattr(cfg, "calibration", None))
    max_len = adapter_for(model).max_seq_len(model)
    ids = calibration_windows(ctx.tokens, calib, max_len, ctx.fingerprint, stage=kind)
    report = StageReport(stage=kind, config=cfg.model_dump(), skipped=sel.skipped)
    errors: dict[str, tuple[float, float]] = {}
    extras: dict[str, dict] = {}
    quant = {"kind": kind, **spec.to_dict()}

    def quantize_block(block: BlockLayout, stats: dict[str, InputStats]) -> None:
        for name, st in stats.items():
            lin = model.get_submodule(name)
            w = lin.weight.detach().float()
            got = fit(w, st, spec)
            packed = pack_linear(got.codes, got.scales, got.zeros, spec, lin.bias, got.input_scale)
            errors[name] = (
                output_error(w, packed.dequantize(), st.H),
                output_error(w, _rtn(w, spec), st.H),
            )
            extras[name] = got.extra
            convert_linears(model, [(name, lin)], lambda _lin, p=packed: p, quant, report)

    run_sequential(model, layout, ids, by_block, quantize_block, BATCH_SIZE)
    weights = bias_bytes = 0
    for t in report.touched:
        err, rtn_err = errors[t["module"]]
        t["reconstruction_error"], t["rtn_error"] = err, rtn_err
        t.update(extras[t["module"]])
        weights += t["shape"][0] * t["shape"][1]
        bias = model.get_submodule(t["module"]).bias
        bias_bytes += bias.nbytes if bias is not None else 0
    if weights:
        report.extra["bits_per_weight"] = 8 * (report.touched_bytes_after - bias_bytes) / weights
    report.extra["backend"] = (
        "torch _weight_int4pack_mm_for_cpu" if spec.bits == 4 else "torch _weight_int8pack_mm"
    ) + f" ({spec.compute_dtype})"
    report.extra["calibration"] = {
        **calib.model_dump(),
        "seq_len": resolve_seq_len(calib, max_len, kind),
        "tokens": ids.numel(),
    }
    if errors:
        report.extra["reconstruction_error_mean"] = sum(e for e, _ in errors.values()) / len(errors)
        report.extra["rtn_error_mean"] = sum(r for _, r in errors.values()) / len(errors)
    return model, report
