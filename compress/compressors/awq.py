"""AWQ-style activation-aware weight quantization (Lin et al., 2024): ``awq``.

A few input channels carry much larger activations than the rest, and rounding the weights
that multiply them costs the most. AWQ scales those weight columns up before rounding, so they
get relatively finer steps, and divides the layer's input by the same scale:
``y = Q(W diag(s)) (x / s)``. The scale is ``s_j = mean|x_j| ** alpha``, normalised so that
``sqrt(max(s) * min(s)) = 1``, and ``alpha`` is searched on a grid of ``grid`` points in
``[0, 1)`` (the authors' reference ``auto_scale``). ``alpha = 0`` is round-to-nearest itself, so
the search never does worse than RTN on the calibration inputs.

As in the reference, each candidate is judged by its output error on the calibration inputs;
here per layer (``||WX - W'X||^2`` from ``H = sum x x^T``, collected block by block like GPTQ,
:mod:`~compress.compressors.sequential`), where the reference judges a group of layers that
share an input by the block's output. The reference then folds ``1 / s`` into the operation
before the layer (a LayerNorm, or the previous linear layer); this stage keeps it as the
layer's own ``input_scale`` (one multiply per input, :class:`~compress.compressors.packed.
PackedLinear`), which works for every layer of every model family, costs ``in_features``
float32 values per layer (counted in its bytes), and a multiply per token. The weights run on
the same packed int4/int8 CPU kernels as ``rtn`` and ``gptq``, with the same grids and the same
refusals (3 bits, other group sizes, a GPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from compress.compressors.base import StageContext, StageReport, register
from compress.compressors.gptq import Fitted, calibrated_packed
from compress.compressors.packed import PackedSpec, choose_qparams, dequantize, quantize
from compress.compressors.rtn import RTNConfig
from compress.compressors.sequential import InputStats, output_error
from compress.data.calibration import CalibrationSpec

KIND = "awq"


class AWQConfig(RTNConfig):
    """The ``rtn`` settings (the same kernels and grids) plus the scale search's."""

    grid: int = Field(20, ge=2, le=200, description="alpha values tried in [0, 1)")
    calibration: CalibrationSpec | None = None  # overrides keys of the recipe's calibration


def awq_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x| ** alpha`` per input channel, normalised to a geometric mid-range of 1."""
    s = abs_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq(weight: torch.Tensor, stats: InputStats, spec: PackedSpec, grid: int = 20) -> Fitted:
    """The scale search for one layer ``weight`` (out, in): the codes of ``W diag(s)`` and the
    input scale ``1 / s`` of the ``alpha`` with the least output error on ``stats``."""
    w = weight.detach().to(torch.float32)
    best: tuple[float, float, Fitted] | None = None
    for i in range(grid):
        alpha = i / grid
        s = awq_scale(stats.abs_mean.to(torch.float32).cpu(), alpha)
        ws = w * s
        scales, zeros = choose_qparams(ws, spec)
        codes = quantize(ws, scales, zeros, spec)
        effective = dequantize(codes, scales, zeros, spec) / s
        err = output_error(w, effective, stats.H)
        if best is None or err < best[0]:
            fitted = Fitted(codes, scales, zeros, None if alpha == 0 else 1.0 / s)
            best = (err, alpha, fitted)
    assert best is not None
    err, alpha, fitted = best
    fitted.extra = {"awq_alpha": alpha}
    return fitted


@register(KIND, AWQConfig)
def apply_awq(model: nn.Module, cfg: AWQConfig, ctx: StageContext) -> tuple[nn.Module, StageReport]:
    """AWQ-style scaled int4/int8 weights on packed CPU kernels."""

    def fit(w: torch.Tensor, st: InputStats, spec: PackedSpec) -> Fitted:
        return awq(w, st, spec, cfg.grid)

    model, report = calibrated_packed(model, cfg, ctx, KIND, fit)
    alphas = [t["awq_alpha"] for t in report.touched]
    if alphas:
        report.extra["awq_alpha_mean"] = sum(alphas) / len(alphas)
        report.extra["awq_layers_scaled"] = sum(a > 0 for a in alphas)
    return model, report
