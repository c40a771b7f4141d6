"""Unstructured and N:M pruning: zero weights for good, chosen by magnitude, Wanda or SparseGPT.

    prune: {method: magnitude | wanda | sparsegpt, sparsity: 0.5}   # or pattern: "2:4"

- ``magnitude``: the smallest |W|. ``scope: layer`` removes the same fraction from every
  targeted weight matrix; ``scope: global`` ranks all targeted weights together, so layers
  with small weights lose more.
- ``wanda`` (:mod:`~compress.compressors.wanda`): the smallest ``|W| * ||X||_2`` per output
  row; no weight update.
- ``sparsegpt`` (:mod:`~compress.compressors.sparsegpt`): OBS reconstruction that updates the
  kept weights to preserve each layer's outputs on the calibration inputs.

``allocation`` spreads the sparsity over the layers (``scope: layer`` only, no pattern):
``uniform`` gives every layer the same; the others follow a per-layer sensitivity scan
(:mod:`compress.scan`), ranking layers by scanned perplexity increase per pruned weight.
``scan`` is OWL-style: less sensitive layers lose more, within ``sparsity +- scan_strength``
(0.1 when unset); ``scan-dense`` leaves the ``dense_layers`` most sensitive layers dense and
prunes the others evenly; ``scan-optimal`` takes the sparsities that minimise the sum of the
scanned increases (within the scanned sparsities, and ``sparsity +- scan_strength`` when
set). All keep the overall sparsity of the targeted layers at exactly ``round(sparsity * n)``
weights (:mod:`compress.scan.allocation`).

``pattern: N:M`` keeps N of every M consecutive input weights of each row (2:4 keeps 2 of 4,
the papers' convention) and fixes the sparsity at ``1 - N/M``. Otherwise exactly
``round(sparsity * n)`` of a layer's ``n`` weights become zero (ties broken by position).
Biases are left alone and nothing stays attached to the model: no masks, no hooks.

Wanda and SparseGPT read activations: they calibrate block by block
(:mod:`~compress.compressors.sequential`) on the recipe's ``calibration`` windows (overridden
per stage by ``calibration:``), and need the model's block layout. Magnitude pruning runs the
same pass when calibration tokens and a layout are there, only to measure. Every pruned layer
in a block reports its output error ``||WX - W'X||^2 / ||WX||^2`` on the calibration inputs it
saw, so the methods compare layer by layer.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from compress.compressors.base import StageConfig, StageContext, StageReport, register
from compress.compressors.masks import lowest, n_of_m, parse_pattern
from compress.compressors.sequential import (
    InputStats,
    block_linears,
    output_error,
    run_sequential,
)
from compress.compressors.sparsegpt import sparsegpt
from compress.compressors.targets import nothing_selected, select_modules
from compress.compressors.wanda import wanda
from compress.data.calibration import (
    CalibrationSpec,
    calibration_windows,
    merge,
    resolve_seq_len,
)
from compress.errors import CompressError
from compress.models.adapter import BlockLayout, LayoutError, ModelLayout, adapter_for

log = logging.getLogger(__name__)

KIND = "prune"
CALIBRATED = ("wanda", "sparsegpt")
BATCH_SIZE = 8  # calibration windows per forward pass


class PruneConfig(StageConfig):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str | None = Field(None, description="N:M, keep N of every M input weights")
    scope: Literal["layer", "global"] = "layer"
    allocation: Literal["uniform", "scan", "scan-dense", "scan-optimal"] = "uniform"
    scan_strength: float | None = Field(
        None, ge=0.0, le=0.5, description="scan, scan-optimal: sparsity +- this (scan: 0.1)"
    )
    dense_layers: int = Field(1, ge=1, description="scan-dense: most sensitive layers kept")
    blocksize: int = Field(128, ge=1, description="sparsegpt: columns updated together")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="sparsegpt: Hessian dampening")
    calibration: CalibrationSpec | None = None  # overrides keys of the recipe's calibration
    targets: list[str] | None = None
    ignore: list[str] = ["lm_head"]

    @field_validator("pattern")
    @classmethod
    def _pattern_form(cls, v: str | None) -> str | None:
        if v is not None:
            n, m = parse_pattern(v)
            return f"{n}:{m}"
        return v

    @model_validator(mode="before")
    @classmethod
    def _pattern_sets_sparsity(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("pattern"), str):
            return data
        try:
            n, m = parse_pattern(data["pattern"])
        except ValueError:
            return data  # reported by the field validator
        fixed = 1 - n / m
        given = data.get("sparsity")
        if given is not None and isinstance(given, (int, float)) and abs(given - fixed) > 1e-9:
            raise ValueError(
                f"pattern {n}:{m} fixes the sparsity at {fixed:g}; leave sparsity out, got {given}"
            )
        return {**data, "sparsity": fixed}

    @model_validator(mode="after")
    def _settings_of_method(self) -> PruneConfig:
        if self.scope == "global" and (self.method != "magnitude" or self.pattern):
            raise ValueError(
                "scope global ranks all layers' weights together: only for method magnitude "
                "without a pattern"
            )
        if self.allocation != "uniform" and (self.pattern or self.scope == "global"):
            raise ValueError(
                f"allocation {self.allocation} sets each layer's sparsity: not with a pattern "
                "or scope global"
            )
        fields = type(self).model_fields
        for key, needs in (
            ("scan_strength", ("scan", "scan-optimal")),
            ("dense_layers", ("scan-dense",)),
        ):
            if key in self.model_fields_set and getattr(self, key) != fields[key].default:
                if self.allocation not in needs:
                    raise ValueError(f"{key}: only read by allocation {' or '.join(needs)}")
        if self.method != "sparsegpt":
            stray = [
                k
                for k in ("blocksize", "damp")
                if k in self.model_fields_set and getattr(self, k) != fields[k].default
            ]
            if stray:
                raise ValueError(f"{', '.join(stray)}: only read by method sparsegpt")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None


def _magnitude_masks(
    weights: dict[str, torch.Tensor], cfg: PruneConfig, sparsity: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Removal masks by |W| for every layer, chosen before any weight changes."""
    if cfg.nm is not None:
        return {n: n_of_m(w.detach().abs().float(), *cfg.nm) for n, w in weights.items()}
    if cfg.scope == "layer":
        return {
            n: lowest(w.detach().abs(), round(sparsity[n] * w.numel())) for n, w in weights.items()
        }
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    mask = lowest(flat, round(cfg.sparsity * flat.numel()))
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = mask[start : start + w.numel()].view_as(w)
        start += w.numel()
    return out


def _check_nm(sel: list[tuple[str, nn.Linear]], cfg: PruneConfig) -> None:
    if cfg.nm is None:
        return
    m = cfg.nm[1]
    for name, lin in sel:
        if lin.in_features % m:
            raise CompressError(
                f"{KIND}.pattern: {name} has {lin.in_features} input columns, not a multiple of "
                f"{m}; leave it out with ignore"
            )


def _layout(model: nn.Module, cfg: PruneConfig) -> tuple[ModelLayout | None, str]:
    """The model's block layout, or None and why (an error for the calibrated methods)."""
    try:
        return adapter_for(model).layout(model), ""
    except LayoutError as exc:
        if cfg.method in CALIBRATED:
            raise CompressError(f"{KIND}.method {cfg.method}: {exc}") from None
        return None, f"no block layout: {exc}"


def layer_sparsity(
    model: nn.Module, modules: dict[str, nn.Linear], cfg: PruneConfig, ctx: StageContext
) -> dict[str, float]:
    """Each layer's sparsity under ``cfg.allocation`` (exact counts over the layers)."""
    if cfg.allocation == "uniform":
        return {n: cfg.sparsity for n in modules}
    if ctx.sensitivity is None:
        raise CompressError(
            f"{KIND}.allocation {cfg.allocation}: needs a sensitivity scan, which this run "
            "does not provide"
        )
    curves = ctx.sensitivity(model)
    missing = [n for n in modules if n not in curves]
    if missing:
        raise CompressError(
            f"{KIND}.allocation {cfg.allocation}: {missing[0]} was not scanned; scan.targets "
            "and scan.ignore must cover the layers prune targets"
        )
    from compress.scan import allocation as alloc

    numel = {n: m.weight.numel() for n, m in modules.items()}
    curves = {n: curves[n] for n in modules}
    try:
        if cfg.allocation == "scan":
            strength = 0.1 if cfg.scan_strength is None else cfg.scan_strength
            counts = alloc.scan_allocation(numel, curves, cfg.sparsity, strength)
        elif cfg.allocation == "scan-optimal":
            counts = alloc.optimal_allocation(numel, curves, cfg.sparsity, cfg.scan_strength)
        else:
            counts = alloc.dense_allocation(numel, curves, cfg.sparsity, cfg.dense_layers)
    except CompressError as exc:
        problem = str(exc).removeprefix("allocation: ")
        raise CompressError(f"{KIND}.allocation {cfg.allocation}: {problem}") from None
    return {n: counts[n] / numel[n] for n in modules}


@register(KIND, PruneConfig)
def apply_prune(
    model: nn.Module, cfg: PruneConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Magnitude, Wanda or SparseGPT pruning to an exact sparsity or an N:M pattern."""
    sel = select_modules(model, (nn.Linear,), cfg.targets, cfg.ignore, stage=KIND)
    if not sel.selected:
        raise nothing_selected(KIND, sel.skipped)
    _check_nm(sel.selected, cfg)
    report = StageReport(stage=KIND, config=cfg.model_dump(), skipped=sel.skipped)
    modules = dict(sel.selected)
    layout, why_not = _layout(model, cfg)
    spec = merge(ctx.calibration, cfg.calibration)
    if layout is not None and spec.split not in ctx.tokens:
        if cfg.method in CALIBRATED:
            raise CompressError(
                f"{KIND}.method {cfg.method}: needs calibration tokens (the {spec.split!r} split)"
            )
        layout, why_not = None, f"no {spec.split!r} split to calibrate on"

    zeros_before = {n: int((m.weight == 0).sum()) for n, m in modules.items()}
    errors: dict[str, float] = {}
    sparsity = layer_sparsity(model, modules, cfg, ctx)
    masks = (
        _magnitude_masks({n: m.weight for n, m in modules.items()}, cfg, sparsity)
        if cfg.method == "magnitude"
        else {}
    )

    def prune_block(block: BlockLayout, stats: dict[str, InputStats]) -> None:
        for name, st in stats.items():
            lin = modules[name]
            w = lin.weight.detach()
            if cfg.method == "sparsegpt":
                new = sparsegpt(w, st.H, sparsity[name], cfg.nm, cfg.blocksize, cfg.damp)
            else:
                mask = (
                    masks[name]
                    if cfg.method == "magnitude"
                    else wanda(w, st.sq_norms, sparsity[name], cfg.nm)
                )
                new = w.float().masked_fill(mask, 0.0)
            errors[name] = output_error(w, new, st.H)
            with torch.no_grad():
                lin.weight.copy_(new.to(lin.weight.dtype))

    outside = list(modules)
    if layout is not None:
        by_block, outside = block_linears(layout, list(modules))
        if outside and cfg.method in CALIBRATED:
            raise CompressError(
                f"{KIND}.targets: {outside[0]} is in no transformer block; {cfg.method} prunes "
                "the blocks' linear layers only (leave it out with ignore)"
            )
        max_len = adapter_for(model).max_seq_len(model)
        ids = calibration_windows(ctx.tokens, spec, max_len, ctx.fingerprint, stage=KIND)
        run_sequential(model, layout, ids, by_block, prune_block, BATCH_SIZE)
        report.extra["calibration"] = {
            **spec.model_dump(),
            "seq_len": resolve_seq_len(spec, max_len, KIND),
            "tokens": ids.numel(),
        }
    else:
        report.extra["calibration"] = None
        report.extra["reconstruction_error_note"] = f"not measured: {why_not}"
    with torch.no_grad():
        for name in outside:  # magnitude only: layers outside the blocks, or no layout
            w = modules[name].weight
            w.masked_fill_(masks[name], 0.0)

    zeros = total = 0
    for name, m in modules.items():
        z = int((m.weight == 0).sum())
        zeros, total = zeros + z, total + m.weight.numel()
        report.touched.append(
            {
                "module": name,
                "from": type(m).__name__,
                "to": type(m).__name__,
                "shape": list(m.weight.shape),
                "zeros_before": zeros_before[name],
                "zeros_after": z,
                "sparsity": z / m.weight.numel(),
                "reconstruction_error": errors.get(name),
            }
        )
    report.extra["method"] = cfg.method
    report.extra["allocation"] = cfg.allocation
    report.extra["pattern"] = cfg.pattern
    report.extra["sparsity"] = zeros / total if total else 0.0
    report.extra["pruned_weights"] = zeros
    report.extra["target_weights"] = total
    if errors:
        report.extra["reconstruction_error_mean"] = sum(errors.values()) / len(errors)
    return model, report
