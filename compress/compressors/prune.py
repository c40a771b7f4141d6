"""Unstructured magnitude pruning: zero the smallest-magnitude weights, permanently.

``scope: layer`` removes the same fraction from every targeted weight matrix; ``scope: global``
ranks all targeted weights together (by absolute value) and removes the smallest fraction
overall, so layers with small weights lose more. Exactly ``round(sparsity * n)`` entries become
zero (ties broken by position), biases are left alone, and nothing remains attached to the
model: no masks, no hooks, no reparametrization. Embeddings and the (tied) LM head are not
``nn.Linear`` targets by default.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from compress.compressors.base import StageConfig, StageContext, StageReport, register
from compress.compressors.targets import nothing_selected, select_modules


class PruneConfig(StageConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    scope: Literal["layer", "global"] = "layer"
    targets: list[str] | None = None
    ignore: list[str] = ["lm_head"]


def _zero_smallest(weights: list[torch.Tensor], k: int) -> None:
    """Set the ``k`` smallest-magnitude entries across ``weights`` (taken together) to zero."""
    if k <= 0:
        return
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    # A stable sort makes ties (e.g. entries that are already zero) deterministic.
    idx = torch.sort(flat, stable=True).indices[:k]
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[idx] = False
    start = 0
    with torch.no_grad():
        for w in weights:
            n = w.numel()
            w.mul_(mask[start : start + n].view_as(w))
            start += n


@register("prune", PruneConfig)
def apply_prune(
    model: nn.Module, cfg: PruneConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Unstructured magnitude pruning to an exact sparsity, per layer or global."""
    sel = select_modules(model, (nn.Linear,), cfg.targets, cfg.ignore, stage="prune")
    if not sel.selected:
        raise nothing_selected("prune", sel.skipped)
    report = StageReport(stage="prune", config=cfg.model_dump(), skipped=sel.skipped)
    weights = [m.weight for _, m in sel.selected]
    before = [int((w == 0).sum()) for w in weights]
    if cfg.scope == "global":
        _zero_smallest(weights, round(cfg.sparsity * sum(w.numel() for w in weights)))
    else:
        for w in weights:
            _zero_smallest([w], round(cfg.sparsity * w.numel()))
    zeros = total = 0
    for (name, m), z0 in zip(sel.selected, before):
        z = int((m.weight == 0).sum())
        zeros, total = zeros + z, total + m.weight.numel()
        report.touched.append(
            {
                "module": name,
                "from": type(m).__name__,
                "to": type(m).__name__,
                "shape": list(m.weight.shape),
                "zeros_before": z0,
                "zeros_after": z,
                "sparsity": z / m.weight.numel(),
            }
        )
    report.extra["sparsity"] = zeros / total if total else 0.0
    report.extra["pruned_weights"] = zeros
    report.extra["target_weights"] = total
    return model, report
