"""AWQ-style activation-aware weight quantization (Lin et al., 2024): ``awq``.

A few input channels carry much larger activations than the rest, and rounding the weights
that multiply them costs the most. AWQ scales those weight columns up before rounding, so they
get relatively finer steps, and divides the layer's input by the same scale:
``y = Q(W diag(s)) (x / s)``. The scale is ``s_j = mean|x_j| ** alpha``, normalised so that
``sqrt(max(s) * min(s)) = 1``, and ``alpha`` is searched on a grid of ``grid`` points in
``[0, 1)`` (the authors' reference ``auto_scale``). ``alpha = 0`` is round-to-nearest itself, so
the search never does worse than RTN on the calibration inputs.

Then, as the reference's ``auto_clip``, each group's weights are clipped to
``+- ratio * max|w|`` before the grid is chosen, ``ratio`` searched on ``clip_grid`` points down
to ``1 - max_shrink`` for each (row, group) by that group's share of the output error; a clip
is kept only if it lowers the layer's whole output error (``clip: false`` turns it off).

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
    clip: bool = True  # search a clipping range per (row, group) after the scale
    clip_grid: int = Field(20, ge=2, le=200, description="clip ratios tried")
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="clip ratios down to 1 - this")
    calibration: CalibrationSpec | None = None  # overrides keys of the recipe's calibration


def awq_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x| ** alpha`` per input channel, normalised to a geometric mid-range of 1."""
    s = abs_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def _codes(ws: torch.Tensor, spec: PackedSpec, ratio: torch.Tensor | None = None):
    """Codes, scales and zeros of ``ws`` on a min-max grid per group, each (row, group)'s
    range first clipped to ``+- ratio * max|w|`` when ``ratio`` (rows, groups) is given."""
    if ratio is None:
        scales, zeros = choose_qparams(ws, spec)
    else:
        rows, cols = ws.shape
        g = ws.reshape(rows, ratio.shape[1], -1)
        limit = g.abs().amax(dim=-1, keepdim=True) * ratio.unsqueeze(-1)
        clipped = torch.maximum(torch.minimum(g, limit), -limit).reshape(rows, cols)
        scales, zeros = choose_qparams(clipped, spec)
    return quantize(ws, scales, zeros, spec), scales, zeros


def _clip_ratios(
    w: torch.Tensor, s: torch.Tensor, H: torch.Tensor, spec: PackedSpec, grid: int, shrink: float
) -> torch.Tensor:
    """Per (row, group): the clip ratio with the least error ``d_g H_gg d_g^T`` of that
    group's columns (the reference's per-group criterion; cross-group terms left out)."""
    rows, cols = w.shape
    groups = spec.groups(cols)
    size = cols // groups
    ws = w * s
    blocks = [H[i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(groups)]
    best_err = torch.full((rows, groups), float("inf"))
    best = torch.ones(rows, groups)
    for i in range(grid):
        r = 1.0 - shrink * i / grid
        ratio = torch.full((rows, groups), r)
        codes, scales, zeros = _codes(ws, spec, ratio)
        d = w - dequantize(codes, scales, zeros, spec) / s
        err = torch.stack(
            [
                (
                    (d[:, j * size : (j + 1) * size] @ blocks[j]) * d[:, j * size : (j + 1) * size]
                ).sum(1)
                for j in range(groups)
            ],
            dim=1,
        )
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


@torch.no_grad()
def awq(
    weight: torch.Tensor,
    stats: InputStats,
    spec: PackedSpec,
    grid: int = 20,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> Fitted:
    """The scale search for one layer ``weight`` (out, in): the codes of ``W diag(s)`` and the
    input scale ``1 / s`` of the ``alpha`` with the least output error on ``stats``, then the
    clipping search (``clip``)."""
    w = weight.detach().to(torch.float32)
    H = stats.H.to(torch.float32).cpu()
    mean = stats.abs_mean.to(torch.float32).cpu()
    best: tuple[float, float, torch.Tensor] | None = None
    for i in range(grid):
        alpha = i / grid
        s = awq_scale(mean, alpha)
        codes, scales, zeros = _codes(w * s, spec)
        err = output_error(w, dequantize(codes, scales, zeros, spec) / s, H)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    err, alpha, s = best
    codes, scales, zeros = _codes(w * s, spec)
    clipped = 0.0
    if clip:
        ratio = _clip_ratios(w, s, H, spec, clip_grid, max_shrink)
        c_codes, c_scales, c_zeros = _codes(w * s, spec, ratio)
        c_err = output_error(w, dequantize(c_codes, c_scales, c_zeros, spec) / s, H)
        if c_err < err:
            codes, scales, zeros, err = c_codes, c_scales, c_zeros, c_err
            clipped = float((ratio < 1).float().mean())
    fitted = Fitted(codes, scales, zeros, None if alpha == 0 else 1.0 / s)
    fitted.extra = {"awq_alpha": alpha, "awq_clipped_groups": clipped}
    return fitted


@register(KIND, AWQConfig)
def apply_awq(model: nn.Module, cfg: AWQConfig, ctx: StageContext) -> tuple[nn.Module, StageReport]:
    """AWQ-style scaled int4/int8 weights on packed CPU kernels."""

    def fit(w: torch.Tensor, st: InputStats, spec: PackedSpec) -> Fitted:
        return awq(w, st, spec, cfg.grid, cfg.clip, cfg.clip_grid, cfg.max_shrink)

    model, report = calibrated_packed(model, cfg, ctx, KIND, fit)
    alphas = [t["awq_alpha"] for t in report.touched]
    if alphas:
        report.extra["awq_alpha_mean"] = sum(alphas) / len(alphas)
        report.extra["awq_layers_scaled"] = sum(a > 0 for a in alphas)
    return model, report
