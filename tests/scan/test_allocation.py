"""Non-uniform sparsity from a scan: exact overall sparsity, more for less sensitive layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compress.compressors import StageContext, run_stage
from compress.compressors.prune import PruneConfig
from compress.errors import CompressError
from compress.scan.allocation import (
    MAX_SPARSITY,
    curve_cost,
    dense_allocation,
    optimal_allocation,
    scan_allocation,
)


def flat(scores: dict[str, float], at: float = 0.5) -> dict[str, list[tuple[float, float]]]:
    """Curves scanned at one sparsity only, with these increases there."""
    return {n: [(at, v)] for n, v in scores.items()}


def test_scan_allocation_keeps_overall_sparsity_exact():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n_layers = int(torch.randint(1, 13, (1,), generator=g))
        sizes = torch.randint(1, 5000, (n_layers,), generator=g).tolist()
        target = float(torch.rand(1, generator=g)) * 0.9
        strength = float(torch.rand(1, generator=g)) * 0.5
        numel = {f"l{i}": n for i, n in enumerate(sizes)}
        scores = {k: float(torch.rand(1, generator=g)) for k in numel}
        counts = scan_allocation(numel, flat(scores), target, strength)
        assert sum(counts.values()) == round(target * sum(sizes)), (sizes, target, strength)
        for k, c in counts.items():
            assert 0 <= c <= MAX_SPARSITY * numel[k]


def test_less_sensitive_layers_get_more_sparsity():
    numel = {n: 1000 for n in "abcde"}
    scores = {"a": 5.0, "b": 0.1, "c": 1.0, "d": 3.0, "e": 0.5}
    counts = scan_allocation(numel, flat(scores), 0.5, 0.2)
    order = sorted(numel, key=lambda n: scores[n])  # least sensitive first
    assert [counts[n] for n in order] == sorted(counts.values(), reverse=True)
    assert counts["b"] == 700 and counts["a"] == 300  # target +- strength at the ends
    assert scan_allocation(numel, flat(scores), 0.5, 0.0) == {n: 500 for n in numel}


def test_dense_allocation_leaves_most_sensitive_dense():
    numel = {"a": 100, "b": 300, "c": 200, "d": 50}
    scores = {"a": 5.0, "b": 0.1, "c": 1.0, "d": 3.0}
    counts = dense_allocation(numel, flat(scores), 0.5, 2)
    assert counts["a"] == counts["d"] == 0
    assert sum(counts.values()) == 325
    with pytest.raises(CompressError, match="dense_layers"):
        dense_allocation(numel, flat(scores), 0.5, 4)
    with pytest.raises(CompressError, match="would need sparsity"):
        dense_allocation(numel, flat(scores), 0.9, 2)


def test_sensitivity_is_per_pruned_weight():
    # "big" loses the most perplexity, but over 40x the weights: per weight pruned it is
    # the cheapest layer, and "small" the dearest.
    numel = {"big": 4000, "small": 100, "mid": 1000}
    scores = {"big": 4.0, "small": 1.0, "mid": 1.5}
    counts = dense_allocation(numel, flat(scores), 0.5, 1)
    assert counts["small"] == 0 and counts["big"] > 0.5 * 4000
    counts = scan_allocation(numel, flat(scores), 0.5, 0.2)
    assert counts["big"] / 4000 > counts["mid"] / 1000 > counts["small"] / 100


def test_curve_cost_interpolates_from_zero_and_extends_the_last_segment():
    curve = [(0.5, 1.0), (0.7, 3.0)]
    assert curve_cost(curve, 0.25) == pytest.approx(0.5)
    assert curve_cost(curve, 0.6) == pytest.approx(2.0)
    assert curve_cost(curve, 0.8) == pytest.approx(4.0)


def _predicted(numel, curves, counts):
    return sum(curve_cost(curves[n], counts[n] / numel[n]) for n in numel)


def test_optimal_allocation_minimises_the_summed_scan_increase():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        n_layers = int(torch.randint(2, 8, (1,), generator=g))
        numel = {f"l{i}": int(torch.randint(50, 3000, (1,), generator=g)) for i in range(n_layers)}
        grid = [0.3, 0.5, 0.7, 0.9]
        curves = {}
        for n in numel:  # convex increasing curves of random steepness
            k, p = float(torch.rand(1, generator=g)) * 5, 1 + float(torch.rand(1, generator=g)) * 3
            curves[n] = [(s, k * s**p) for s in grid]
        target = 0.2 + float(torch.rand(1, generator=g)) * 0.65
        total = round(target * sum(numel.values()))
        counts = optimal_allocation(numel, curves, target)
        assert sum(counts.values()) == total
        assert all(0 <= counts[n] <= 0.9 * numel[n] + 1 for n in numel)
        best = _predicted(numel, curves, counts)
        uniform = scan_allocation(numel, flat({n: 0.0 for n in numel}), target, 0.0)
        # whole weights: each count is within one weight of the continuous optimum
        assert best <= _predicted(numel, curves, uniform) + 1e-3 * (1 + best)
        for _ in range(20):  # no other feasible allocation predicts less
            other = scan_allocation(
                numel,
                {n: [(0.5, float(torch.rand(1, generator=g)))] for n in numel},
                target,
                float(torch.rand(1, generator=g)) * 0.3,
            )
            if all(other[n] <= 0.9 * numel[n] for n in numel):
                assert best <= _predicted(numel, curves, other) + 1e-3 * (1 + best)


def test_optimal_allocation_keeps_to_the_band_and_the_scanned_range():
    numel = {"a": 1000, "b": 1000, "c": 2000}
    curves = {
        "a": [(0.5, 0.0), (0.9, 0.1)],
        "b": [(0.5, 5.0), (0.9, 9.0)],
        "c": [(0.5, 1.0), (0.9, 3.0)],
    }
    free = optimal_allocation(numel, curves, 0.5)
    assert free["a"] == 900 and free["b"] < 100  # "a" costs nothing up to the scan's end
    band = optimal_allocation(numel, curves, 0.5, 0.1)
    assert all(0.4 * numel[n] <= band[n] <= 0.6 * numel[n] for n in numel)
    assert sum(band.values()) == sum(free.values()) == 2000
    with pytest.raises(CompressError, match="scan a higher sparsity"):
        optimal_allocation(numel, curves, 0.95)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("allocation", ["scan", "scan-dense", "scan-optimal"])
def test_prune_stage_follows_the_scan(tiny_workspace, method, allocation):
    ws = tiny_workspace
    model = copy.deepcopy(ws.baseline)
    names = list(_linears(model))
    numel = {n: m.weight.numel() for n, m in _linears(model).items()}
    # later layers more sensitive per weight; the curve is convex up to 0.9
    scores = {n: float(i + 1) * numel[n] / 1000 for i, n in enumerate(names)}
    seen = []

    def sensitivity(m):
        seen.append(m)
        return {n: [(0.5, v), (0.9, 4 * v)] for n, v in scores.items()}

    ctx = StageContext(
        tokens=ws.tokens,
        calibration=ws.recipe.calibration.model_copy(update={"samples": 8}),
        sensitivity=sensitivity,
    )
    extra = {"scan": {"scan_strength": 0.2}, "scan-dense": {"dense_layers": 2}}
    cfg = PruneConfig(
        method=method, sparsity=0.5, allocation=allocation, **extra.get(allocation, {})
    )
    model, report = run_stage("prune", model, cfg, ctx)
    assert len(seen) == 1
    zeros = {n: int((m.weight == 0).sum()) for n, m in _linears(model).items()}
    total = sum(m.weight.numel() for m in _linears(model).values())
    assert sum(zeros.values()) == round(0.5 * total)  # exact overall
    assert report.extra["sparsity"] == pytest.approx(round(0.5 * total) / total)
    frac = {n: zeros[n] / _linears(model)[n].weight.numel() for n in names}
    if allocation == "scan":
        assert frac[names[0]] > 0.6 and frac[names[-1]] < 0.4
    elif allocation == "scan-optimal":
        assert frac[names[0]] == pytest.approx(0.9, abs=1e-3) and frac[names[-1]] < 0.5
    else:
        assert frac[names[-1]] == frac[names[-2]] == 0.0


def test_allocation_needs_a_scan_and_rejects_patterns(tiny_workspace):
    model = copy.deepcopy(tiny_workspace.baseline)
    with pytest.raises(CompressError, match="needs a sensitivity scan"):
        run_stage("prune", model, PruneConfig(allocation="scan"), StageContext())
    with pytest.raises(ValueError, match="not with a pattern"):
        PruneConfig(allocation="scan", pattern="2:4")
    with pytest.raises(ValueError, match="only read by allocation scan or scan-optimal"):
        PruneConfig(scan_strength=0.2)


def test_a_run_variant_allocates_from_the_scan_of_its_baseline(tiny_workspace, tiny_recipe_dict):
    import dataclasses

    from compress.recipe import VariantSpec, recipe_from_dict
    from compress.scan.workspace import scan_workspace
    from compress.workbench import build_variant

    data = {**tiny_recipe_dict, "scan": {"tokens": 512, "prune": {"sparsities": [0.5]}}}
    data["scan"]["quantize"] = None
    ws = dataclasses.replace(tiny_workspace, recipe=recipe_from_dict(data, "t.yaml"))
    spec = VariantSpec(
        name="v", pipeline=[{"prune": {"sparsity": 0.5, "allocation": "scan-dense"}}]
    )
    model, (report,) = build_variant(ws, spec, {"baseline": ws.baseline})
    most = scan_workspace(ws).allocation_ranking(0.5)[0]  # cached by now
    row = next(t for t in report.touched if t["module"] == most)
    assert row["sparsity"] == 0.0 and report.extra["allocation"] == "scan-dense"
    total = sum(t["shape"][0] * t["shape"][1] for t in report.touched)
    assert report.extra["pruned_weights"] == round(0.5 * total)


def test_a_layer_that_breaks_the_model_is_pruned_last():
    from tests.scan.test_scan import _result

    res = _result([("a", 0.5, 0.4, 0.6), ("b", 0.2, 0.1, 0.3)])
    for r in res.rows:  # pruning "a" alone overflowed the perplexity
        if r["layer"] == "a":
            r["delta"] = r["delta_lo"] = r["delta_hi"] = float("inf")
    curves = res.curves()
    assert all(d < float("inf") for _, d in curves["a"])
    counts = optimal_allocation({"a": 100, "b": 100}, curves, 0.25)
    assert counts == {"a": 0, "b": 50}
    assert dense_allocation({"a": 100, "b": 100}, curves, 0.25, 1) == {"a": 0, "b": 50}
