"""The scan in a sweep: allocation as a search dimension, and seeds built from the scan."""

from __future__ import annotations

import pytest

from compress.errors import RecipeError
from compress.recipe import recipe_from_dict
from compress.sweep.space import defaults, resolve, scan_seed_assignments
from tests.conftest import TINY_RECIPE


def _recipe(**sweep) -> dict:
    base = {k: v for k, v in TINY_RECIPE.items() if k != "variants"}
    spec = {
        "trials": 6,
        "params": {
            "prune": {"choice": [False, True]},
            "sparsity": {"float": [0.2, 0.6], "step": 0.1, "when": {"prune": True}},
            "allocation": {
                "choice": ["uniform", "scan", "scan-dense", "scan-optimal"],
                "when": {"prune": True},
            },
        },
        "pipeline": [
            {
                "prune": {"sparsity": "$sparsity", "allocation": "$allocation"},
                "when": {"prune": True},
            }
        ],
    }
    spec.update(sweep)
    return {**base, "name": "s", "sweep": spec}


def test_sweep_space_takes_allocation_as_a_choice() -> None:
    spec = recipe_from_dict(_recipe(), "s.yaml").sweep
    values = defaults(spec, {"prune": True, "sparsity": 0.5, "allocation": "scan"})
    assert resolve(spec, values) == [{"prune": {"sparsity": 0.5, "allocation": "scan"}}]


def test_a_bad_allocation_choice_names_the_key() -> None:
    data = _recipe()
    data["sweep"]["params"]["allocation"]["choice"] = ["uniform", "owl"]
    with pytest.raises(RecipeError, match=r"sweep.pipeline\[0\].prune.allocation"):
        recipe_from_dict(data, "s.yaml")


def test_scan_seeds_cover_scanned_sparsities_in_range() -> None:
    spec = recipe_from_dict(_recipe(scan_seeds=True), "s.yaml").sweep
    seeds = scan_seed_assignments(spec, [0.3, 0.5, 0.7])
    assert set(seeds) == {
        "scan-0.3",
        "scan-0.5",
        "scan-dense-0.3",
        "scan-dense-0.5",
        "scan-optimal-0.3",
        "scan-optimal-0.5",
    }
    assert seeds["scan-0.5"] == {"prune": True, "sparsity": 0.5, "allocation": "scan"}
    assert resolve(spec, seeds["scan-dense-0.3"]) == [
        {"prune": {"sparsity": 0.3, "allocation": "scan-dense"}}
    ]


def test_scan_seeds_need_an_allocation_parameter() -> None:
    data = _recipe(scan_seeds=True)
    data["sweep"]["params"]["allocation"]["choice"] = ["uniform"]
    with pytest.raises(RecipeError, match="sweep.scan_seeds: needs a prune stage"):
        recipe_from_dict(data, "s.yaml")


def test_the_sweep_builds_its_scan_seeds_from_the_baseline_scan(tiny_workspace) -> None:
    import dataclasses
    import types

    from compress.sweep.objective import scan_seeds

    data = _recipe(scan_seeds=True)
    data["scan"] = {"tokens": 512, "prune": {"sparsities": [0.4, 0.9]}, "quantize": None}
    recipe = recipe_from_dict(data, "s.yaml")
    ws = dataclasses.replace(tiny_workspace, recipe=recipe)
    said: list[str] = []
    worker = types.SimpleNamespace(ws=ws, spec=recipe.sweep, progress=False)
    seeds = scan_seeds(worker, said.append)
    # 0.9 is outside the sparsity range [0.2, 0.6]: only 0.4 makes seeds
    assert set(seeds) == {"scan-0.4", "scan-dense-0.4", "scan-optimal-0.4"}
    assert "3 seed(s)" in said[-1]
