"""Per-layer sparsity from a sensitivity scan, at exactly the overall sparsity of a uniform
target (OWL-style non-uniform allocation).

The scan gives each layer a curve: its perplexity increase when only it is pruned, at each
scanned sparsity (:class:`Curve`; zero at sparsity 0, linear in between). Every allocation
prunes the same number of weights, so a layer's sensitivity is its cost *per pruned weight*:
``increase(target) / (target * weights)``. Moving ``w`` pruned weights from layer A to layer B
changes the predicted increase by ``w * (d_B'/n_B - d_A'/n_A)``; a large MLP matrix with a
large total increase can be the cheapest place to prune, and a small attention matrix with a
moderate one the dearest.

- ``scan``: layers are ranked by that per-weight sensitivity; the least sensitive gets
  ``target + strength``, the most sensitive ``target - strength``, the others linearly by
  rank in between (OWL maps its outlier ratios linearly into the same band; ranks are used
  here because one very sensitive layer would otherwise squeeze every other layer into one
  value). The band is then shifted so that the weight-count-weighted mean is the target.
- ``scan-dense``: the ``dense_layers`` most sensitive layers (per weight) are left dense, and
  the others share the target's pruned weights evenly.
- ``scan-optimal``: the sparsities that minimise the sum of the layers' scanned increases
  (each layer's curve made convex, then filled cheapest slope per weight first: the exact
  minimum of that sum), each layer within the scanned range ``[0, highest scanned sparsity]``
  and within ``target +- strength`` when a strength is given. It predicts the model's increase
  as the sum of the single-layer ones, which holds while the increases are small.

Both return whole counts of pruned weights per layer that add up to exactly
``round(target * total weights)``, each within ``[0, MAX_SPARSITY * n]`` of its layer.
"""

from __future__ import annotations

import math

from compress.errors import CompressError

MAX_SPARSITY = 0.99  # no layer loses more than this fraction of its weights

Curve = list[tuple[float, float]]
"""(sparsity, perplexity increase) points of one layer, sparsities increasing, all in (0, 1)."""


def curve_cost(curve: Curve, sparsity: float) -> float:
    """The increase at ``sparsity``: linear between the scanned points and from (0, 0), the
    last segment's slope beyond the highest scanned sparsity."""
    points = [(0.0, 0.0), *curve]
    for (s0, d0), (s1, d1) in zip(points, points[1:]):
        if sparsity <= s1:
            return d0 + (d1 - d0) * (sparsity - s0) / (s1 - s0)
    (s0, d0), (s1, d1) = points[-2], points[-1]
    return d1 + (d1 - d0) * (sparsity - s1) / (s1 - s0)


def per_weight(numel: dict[str, int], curves: dict[str, Curve], target: float) -> dict[str, float]:
    """Each layer's scanned increase at ``target`` per weight pruned there: what the
    allocations rank layers by (higher is more sensitive)."""
    at = max(target, 1e-6)
    return {n: curve_cost(curves[n], at) / (at * numel[n]) for n in numel}


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
    numel: dict[str, int], curves: dict[str, Curve], target: float, strength: float
) -> dict[str, int]:
    """Pruned-weight counts per layer: more for less sensitive layers (per weight), ``target``
    overall exactly. ``strength`` 0 gives uniform sparsity."""
    total = _target_total(numel, target)
    scores = per_weight(numel, curves, target)
    names = list(numel)
    order = sorted(names, key=lambda n: (scores[n], names.index(n)))  # least sensitive first
    last = max(len(order) - 1, 1)
    raw = {n: target + strength * (1 - 2 * i / last) for i, n in enumerate(order)}
    if len(order) == 1:
        raw = {order[0]: target}
    return _counts(numel, _shifted(raw, numel, total), total)


def dense_allocation(
    numel: dict[str, int], curves: dict[str, Curve], target: float, dense_layers: int
) -> dict[str, int]:
    """Pruned-weight counts per layer with the ``dense_layers`` most sensitive layers (per
    weight) left dense and the others at one sparsity, ``target`` overall exactly."""
    total = _target_total(numel, target)
    scores = per_weight(numel, curves, target)
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


def _convex(curve: Curve, top: float) -> list[tuple[float, float]]:
    """The greatest convex function below the curve's points on ``[0, top]`` (its lower hull,
    from (0, 0)), as points."""
    points = [(0.0, 0.0), *((s, d) for s, d in curve if s < top), (top, curve_cost(curve, top))]
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):  # hull[-1] not below
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def optimal_allocation(
    numel: dict[str, int], curves: dict[str, Curve], target: float, strength: float | None = None
) -> dict[str, int]:
    """Pruned-weight counts per layer that minimise the summed scanned increase at ``target``
    overall exactly, each layer within the scanned sparsities (and ``target +- strength``)."""
    total = _target_total(numel, target)
    lo = {n: 0.0 for n in numel}
    hi = {n: min(max(s for s, _ in curves[n]), MAX_SPARSITY) for n in numel}
    if strength is not None:
        lo = {n: max(target - strength, 0.0) for n in numel}
        hi = {n: min(hi[n], target + strength) for n in numel}
    if sum(hi[n] * numel[n] for n in numel) < total - 1e-6:
        raise CompressError(
            f"allocation: sparsity {target} is above what the scanned sparsities allow "
            f"(at most {max(hi.values()):g} per layer): scan a higher sparsity"
        )
    # Every layer starts at its floor; segments of the convex curves are then taken cheapest
    # cost per pruned weight first: the fractional-knapsack optimum of a convex separable sum.
    sparsity = dict(lo)
    need = total - sum(lo[n] * numel[n] for n in numel)
    segments = []
    for n in numel:
        hull = _convex(curves[n], hi[n])
        for (s0, d0), (s1, d1) in zip(hull, hull[1:]):
            a, b = max(s0, lo[n]), s1
            if b > a:
                slope = (d1 - d0) / ((s1 - s0) * numel[n])
                segments.append((slope, list(numel).index(n), n, a, b))
    for _slope, _i, n, a, b in sorted(segments):
        if need <= 0:
            break
        take = min((b - a) * numel[n], need)
        sparsity[n] += take / numel[n]
        need -= take
    return _counts(numel, sparsity, total)
