"""Pruning masks from per-weight scores: exact counts per layer, per row, or N:M groups.

A mask is a bool tensor shaped like the weight, True where the weight is removed. Scores are
"importance": the lowest-scored weights go, ties broken by position (a stable sort), so the
same scores always give the same mask. Counts are exact: a layer of ``n`` weights pruned to
``sparsity`` loses ``round(sparsity * n)`` of them, also when the choice is made row by row or
block by block (each part's count is the difference of the rounded running totals).
"""

from __future__ import annotations

import re

import torch

PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive input weights (N < M)."""
    match = PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"pattern must look like N:M (e.g. 2:4), got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not n < m:
        raise ValueError(f"pattern {text}: N (weights kept) must be below M (group size)")
    return n, m


def running_count(sparsity: float, total: int) -> int:
    """How many of the first ``total`` weights (in the order parts are chosen) are pruned."""
    return round(sparsity * total)


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest ``scores`` of the whole tensor."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.sort(flat, stable=True).indices[:k]] = True
    return mask.view_as(scores)


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask removing the lowest scores of each row (out, in): row ``i`` loses
    ``running_count(s, (i + 1) * in) - running_count(s, i * in)``, about ``s * in`` each, and
    the layer exactly ``round(s * out * in)``."""
    rows, cols = scores.shape
    totals = torch.tensor([running_count(sparsity, i * cols) for i in range(rows + 1)])
    k = (totals[1:] - totals[:-1]).unsqueeze(1)  # (out, 1)
    order = torch.sort(scores, dim=1, stable=True).indices
    drop = torch.arange(cols).unsqueeze(0) < k  # (out, in): the first k of each sorted row
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, drop)


def n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask keeping the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of the group size {m}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices
    drop = (torch.arange(m) < m - n).expand_as(groups)
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, drop).view(rows, cols)
