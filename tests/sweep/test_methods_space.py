"""The calibrated methods in a sweep's search space: pruning method and N:M pattern, and the
packed quantizers (rtn, gptq, awq) as choices, each resolving to the stage it names."""

from __future__ import annotations

import itertools

import pytest

from compress.errors import RecipeError
from compress.recipe import recipe_from_dict
from compress.sweep.space import defaults, resolve
from tests.conftest import TINY_RECIPE

QUANTIZERS = ["none", "rtn", "gptq", "awq"]


def _recipe() -> dict:
    base = {k: v for k, v in TINY_RECIPE.items() if k != "variants"}
    return {
        **base,
        "name": "m",
        "sweep": {
            "trials": 8,
            "params": {
                "prune": {"choice": [False, True]},
                "method": {"choice": ["magnitude", "wanda", "sparsegpt"], "when": {"prune": True}},
                "sparsity": {"float": [0.3, 0.7], "step": 0.1, "when": {"prune": True}},
                "quantizer": {"choice": QUANTIZERS},
            },
            "pipeline": [
                {
                    "prune": {"method": "$method", "sparsity": "$sparsity"},
                    "when": {"prune": True},
                },
                *(
                    {q: {"bits": 4, "group_size": 64}, "when": {"quantizer": q}}
                    for q in QUANTIZERS[1:]
                ),
            ],
        },
    }


def test_every_method_and_quantizer_resolves_to_its_stages() -> None:
    spec = recipe_from_dict(_recipe(), "m.yaml").sweep
    for method, quantizer in itertools.product(["magnitude", "wanda", "sparsegpt"], QUANTIZERS):
        given = {"prune": True, "method": method, "sparsity": 0.5, "quantizer": quantizer}
        values = defaults(spec, given)
        stages = resolve(spec, values)
        assert stages[0] == {"prune": {"method": method, "sparsity": 0.5}}
        if quantizer == "none":
            assert len(stages) == 1
        else:
            assert stages[1] == {quantizer: {"bits": 4, "group_size": 64}}


def test_a_method_the_stage_lacks_names_the_key() -> None:
    data = _recipe()
    data["sweep"]["params"]["method"]["choice"] = ["magnitude", "obs"]
    with pytest.raises(RecipeError, match=r"sweep.pipeline\[0\].prune.method"):
        recipe_from_dict(data, "m.yaml")
