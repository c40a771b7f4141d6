"""Non-uniform sparsity from a scan: exact overall sparsity, more for less sensitive layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compress.compressors import StageContext, run_stage
from compress.compressors.prune import PruneConfig
from compress.errors import CompressError
from compress.scan.allocation import MAX_SPARSITY, dense_allocation, scan_allocation


def test_scan_allocation_keeps_overall_sparsity_exact():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n_layers = int(torch.randint(1, 13, (1,), generator=g))
        sizes = torch.randint(1, 5000, (n_layers,), generator=g).tolist()
        target = float(torch.rand(1, generator=g)) * 0.9
        strength = float(torch.rand(1, generator=g)) * 0.5
        numel = {f"l{i}": n for i, n in enumerate(sizes)}
        scores = {k: float(torch.rand(1, generator=g)) for k in numel}
        counts = scan_allocation(numel, scores, target, strength)
        assert sum(counts.values()) == round(target * sum(sizes)), (sizes, target, strength)
        for k, c in counts.items():
            assert 0 <= c <= MAX_SPARSITY * numel[k]


def test_less_sensitive_layers_get_more_sparsity():
    numel = {n: 1000 for n in "abcde"}
    scores = {"a": 5.0, "b": 0.1, "c": 1.0, "d": 3.0, "e": 0.5}
    counts = scan_allocation(numel, scores, 0.5, 0.2)
    order = sorted(numel, key=lambda n: scores[n])  # least sensitive first
    assert [counts[n] for n in order] == sorted(counts.values(), reverse=True)
    assert counts["b"] == 700 and counts["a"] == 300  # target +- strength at the ends
    assert scan_allocation(numel, scores, 0.5, 0.0) == {n: 500 for n in numel}


def test_dense_allocation_leaves_most_sensitive_dense():
    numel = {"a": 100, "b": 300, "c": 200, "d": 50}
    scores = {"a": 5.0, "b": 0.1, "c": 1.0, "d": 3.0}
    counts = dense_allocation(numel, scores, 0.5, 2)
    assert counts["a"] == counts["d"] == 0
    assert sum(counts.values()) == 325
    with pytest.raises(CompressError, match="dense_layers"):
        dense_allocation(numel, scores, 0.5, 4)
    with pytest.raises(CompressError, match="would need sparsity"):
        dense_allocation(numel, scores, 0.9, 2)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("allocation", ["scan", "scan-dense"])
def test_prune_stage_follows_the_scan(tiny_workspace, method, allocation):
    ws = tiny_workspace
    model = copy.deepcopy(ws.baseline)
    names = list(_linears(model))
    scores = {n: float(i) for i, n in enumerate(names)}  # later layers more sensitive
    seen = []

    def sensitivity(m, sparsity):
        seen.append(sparsity)
        return scores

    ctx = StageContext(
        tokens=ws.tokens,
        calibration=ws.recipe.calibration.model_copy(update={"samples": 8}),
        sensitivity=sensitivity,
    )
    cfg = (
        PruneConfig(method=method, sparsity=0.5, allocation=allocation, scan_strength=0.2)
        if (allocation == "scan")
        else PruneConfig(method=method, sparsity=0.5, allocation=allocation, dense_layers=2)
    )
    model, report = run_stage("prune", model, cfg, ctx)
    assert seen == [0.5]
    zeros = {n: int((m.weight == 0).sum()) for n, m in _linears(model).items()}
    total = sum(m.weight.numel() for m in _linears(model).values())
    assert sum(zeros.values()) == round(0.5 * total)  # exact overall
    assert report.extra["sparsity"] == pytest.approx(round(0.5 * total) / total)
    frac = {n: zeros[n] / _linears(model)[n].weight.numel() for n in names}
    if allocation == "scan":
        assert frac[names[0]] > 0.6 and frac[names[-1]] < 0.4
    else:
        assert frac[names[-1]] == frac[names[-2]] == 0.0


def test_allocation_needs_a_scan_and_rejects_patterns(tiny_workspace):
    model = copy.deepcopy(tiny_workspace.baseline)
    with pytest.raises(CompressError, match="needs a sensitivity scan"):
        run_stage("prune", model, PruneConfig(allocation="scan"), StageContext())
    with pytest.raises(ValueError, match="not with a pattern"):
        PruneConfig(allocation="scan", pattern="2:4")
    with pytest.raises(ValueError, match="only read by allocation scan"):
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
    most = scan_workspace(ws).ranking("prune magnitude 0.5")[0]  # cached by now
    row = next(t for t in report.touched if t["module"] == most)
    assert row["sparsity"] == 0.0 and report.extra["allocation"] == "scan-dense"
    total = sum(t["shape"][0] * t["shape"][1] for t in report.touched)
    assert report.extra["pruned_weights"] == round(0.5 * total)
