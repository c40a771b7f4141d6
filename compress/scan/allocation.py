"""Per-layer sparsity from a sensitivity scan, at exactly the overall sparsity of a uniform
target (OWL-style non-uniform allocation).

- ``scan``: layers are ranked by their scanned perplexity increase; the least sensitive gets
  ``target + strength``, the most sensitive ``target - strength``, the others linearly by
  rank in between (OWL maps its outlier ratios linearly into the same band; ranks are used
  here because one very sensitive layer would otherwise squeeze every other layer into one
  value). The band is then shifted so that the weight-count-weighted mean is the target.
- ``scan-dense``: the ``dense_layers`` most sensitive layers are left dense, and the others
  share the target's pruned weights evenly.

Both return whole counts of pruned weights per layer that add up to exactly
``round(target * total weights)``, each within ``[0, MAX_SPARSITY * n]`` of its layer.
"""

from __future__ import annotations

import math

from compress.errors import CompressError

MAX_SPARSITY = 0.99  # no layer loses more than this fraction of its weights


def _counts(numel: dict[str, int], sparsity: dict[str, float], total: int) -> dict[str, int]:
    """Whole counts near ``sparsity * n`` per layer, summing to ``total`` (largest remainder)."""
    caps = {n: math.floor(MAX_SPARSITY * k) for n, k in numel.items()}
    exact = {n: min(max(sparsity[n], 0.0) * numel[n], caps[n]) for n in numel}
    counts = {n: math.floor(v) for n, v in exact.items()}
    left = total - sum(counts.values())
    order = sorted(numel, key=lambda n: -(exact[n] - counts[n]))
    while left > 0:
        moved = False
        for n in order:
            if left and counts[n] < caps[n]:
                counts[n] += 1
                left -= 1
                moved = True
        if not moved:
            raise CompressError(
                f"allocation: cannot prune {total} weights with at most {MAX_SPARSITY:g} of "
                "each layer"
            )
    while left < 0:  # only if floors overshot, which they cannot; kept for safety
        for n in reversed(order):
            if left and counts[n] > 0:
                counts[n] -= 1
                left += 1
    return counts


def _target_total(numel: dict[str, int], target: float) -> int:
    if not numel:
        raise CompressError("allocation: no layers to allocate sparsity to")
    n_all = sum(numel.values())
    total = round(target * n_all)
    if total > sum(math.floor(MAX_SPARSITY * k) for k in numel.values()):
        raise CompressError(f"allocation: sparsity {target} is above {MAX_SPARSITY} per layer")
    return total


def _shifted(raw: dict[str, float], numel: dict[str, int], total: int) -> dict[str, float]:
    """``raw + c`` clipped to [0, MAX_SPARSITY], with ``c`` found by bisection so that the
    weighted sum is ``total`` weights."""

    def pruned(c: float) -> float:
        return sum(min(max(raw[n] + c, 0.0), MAX_SPARSITY) * numel[n] for n in raw)

    lo, hi = -2.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if pruned(mid) < total:
            lo = mid
        else:
            hi = mid
    return {n: min(max(raw[n] + hi, 0.0), MAX_SPARSITY) for n in raw}


def scan_allocation(
    numel: dict[str, int], scores: dict[str, float], target: float, strength: float
) -> dict[str, int]:
    """Pruned-weight counts per layer: more for less sensitive layers (higher ``scores`` mean
    more sensitive), ``target`` overall exactly. ``strength`` 0 gives uniform sparsity."""
    total = _target_total(numel, target)
    names = list(numel)
    order = sorted(names, key=lambda n: (scores[n], names.index(n)))  # least sensitive first
    last = max(len(order) - 1, 1)
    raw = {n: target + strength * (1 - 2 * i / last) for i, n in enumerate(order)}
    if len(order) == 1:
        raw = {order[0]: target}
    return _counts(numel, _shifted(raw, numel, total), total)


def dense_allocation(
    numel: dict[str, int], scores: dict[str, float], target: float, dense_layers: int
) -> dict[str, int]:
    """Pruned-weight counts per layer with the ``dense_layers`` most sensitive layers left
    dense and the others at one sparsity, ``target`` overall exactly."""
    total = _target_total(numel, target)
    names = list(numel)
    if dense_layers >= len(names):
        raise CompressError(
            f"allocation: dense_layers {dense_layers} leaves none of the {len(names)} layers "
            "to prune"
        )
    ranked = sorted(names, key=lambda n: (-scores[n], names.index(n)))
    dense = set(ranked[:dense_layers])
    rest = sum(numel[n] for n in names if n not in dense)
    share = total / rest
    if share > MAX_SPARSITY:
        raise CompressError(
            f"allocation: with {dense_layers} layers dense the others would need sparsity "
            f"{share:.3f} (> {MAX_SPARSITY}) to reach {target}"
        )
    return _counts(numel, {n: 0.0 if n in dense else share for n in names}, total)
