"""Wanda (Sun et al., 2024): prune by weight magnitude times input activation norm.

The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``, with ``X_j`` input feature ``j`` over
every calibration token; weights are compared within each output row (or within each group of
M columns for N:M), and the kept weights are not updated. Follows the authors' reference
``prune_wanda`` (``W_metric = |W| * sqrt(scaler_row)``); counts are exact per layer (see
:mod:`compress.compressors.masks`).
"""

from __future__ import annotations

import torch

from compress.compressors.masks import lowest_per_row, n_of_m


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||_2`` (out, in) from the per-column squared norms ``||X_j||_2^2``."""
    return weight.detach().abs().to(torch.float32) * sq_norms.to(torch.float32).sqrt().unsqueeze(0)


@torch.no_grad()
def wanda(
    weight: torch.Tensor,
    sq_norms: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The removal mask (True = pruned) of ``weight`` (out, in)."""
    scores = wanda_scores(weight, sq_norms)
    if pattern is not None:
        return n_of_m(scores, *pattern)
    return lowest_per_row(scores, sparsity)
