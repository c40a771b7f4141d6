"""The sweep section: validation at load, `$param` templates, `when`, defaults and seeds."""

from __future__ import annotations

import copy

import pytest

from compress.errors import RecipeError
from compress.recipe import recipe_from_dict
from compress.sweep.space import corner_assignments, defaults, resolve
from tests.sweep.conftest import sweep_recipe


def _load(sweep_overrides: dict | None = None, **top) -> object:
    data = sweep_recipe(**(sweep_overrides or {}))
    data.update(top)
    return recipe_from_dict(data, "s.yaml", "s")


def test_template_resolves_with_when_and_params() -> None:
    spec = _load().sweep
    assert resolve(spec, defaults(spec)) == []  # the baseline
    values = defaults(spec, {"prune": True, "sparsity": 0.3, "quantizer": "cpu-int8"})
    assert resolve(spec, values) == [{"prune": {"sparsity": 0.3}}, {"dynamic-int8": {}}]
    # an inactive parameter is not part of the assignment
    assert "sparsity" not in defaults(spec, {"quantizer": "int8"})


def test_corner_assignments_cover_every_choice_and_both_bounds() -> None:
    spec = _load().sweep
    corners = list(corner_assignments(spec))
    assert {c["quantizer"] for c in corners} == {"none", "int8", "cpu-int8"}
    sparsities = {c["sparsity"] for c in corners if "sparsity" in c}
    assert sparsities == {0.1, 0.8}
    assert all("sparsity" not in c for c in corners if not c["prune"])


def _with_param(name: str, spec: dict) -> dict:
    sweep = sweep_recipe()["sweep"]
    params = copy.deepcopy(sweep["params"])
    params[name] = spec
    return {"params": params}


BAD = [
    (
        {"objectives": ["perplexity", "speed"]},
        "sweep.objectives",
        "unknown metric 'speed'; allowed: perplexity",
    ),
    (_with_param("sparsity", {"float": [0.8, 0.1]}), "sweep.params.sparsity", "low must be below"),
    (
        _with_param("sparsity", {"float": [0.1, 0.8], "choice": [1]}),
        "sweep.params.sparsity",
        "exactly one of",
    ),
    (
        _with_param("sparsity", {"float": [0.1, 0.8], "when": {"quantizer": "int8"}}),
        "sweep.params.sparsity.when.quantizer",
        "declared earlier",
    ),
    (
        _with_param("sparsity", {"float": [0.1, 0.8], "when": {"prune": "yes"}}),
        "sweep.params.sparsity.when.prune",
        "'yes' is not one of [False, True]",
    ),
    (
        _with_param("sparsity", {"float": [0.1, 1.0], "when": {"prune": True}}),
        "sweep.pipeline[0].prune.sparsity",
        "less than 1",
    ),
    (
        {
            "pipeline": [
                {"prune": {"sparsity": "$density"}, "when": {"prune": True}},
                *sweep_recipe()["sweep"]["pipeline"][1:],
            ]
        },
        "sweep.pipeline[0]",
        "$density is not a declared parameter",
    ),
    (
        {
            "pipeline": [
                {"prune": {"sparsity": "$sparsity"}},
                *sweep_recipe()["sweep"]["pipeline"][1:],
            ]
        },
        "sweep.pipeline[0]",
        "$sparsity, which is not active",
    ),
    (
        {"seeds": {"x": {"quantizer": "fp8"}}},
        "sweep.seeds.x.quantizer",
        "'fp8' is outside the choices",
    ),
    ({"seeds": {"x": {"bits": 4}}}, "sweep.seeds.x", "unknown parameter 'bits'"),
    ({"seeds": {"baseline": {}}}, "sweep.seeds.baseline", "not 'baseline'"),
    (
        _with_param("quantizer", {"choice": ["int8", "none", "cpu-int8"]}),
        "sweep.params",
        "the defaults switch on int8",
    ),
    (
        {"params": {**sweep_recipe()["sweep"]["params"], "lr": {"float": [1e-4, 1e-2]}}},
        "sweep.params.lr",
        "not used by the pipeline",
    ),
    ({"constraints": [{"metric": "ppl", "max": 1.05}]}, "sweep.constraints[0].metric", "ppl"),
    ({"sampler": {"name": "cmaes"}}, "sweep.sampler.name", "'tpe', 'nsga2' or 'random'"),
    ({"trails": 3}, "sweep.trails", "unknown key; allowed keys: study, storage, trials"),
    ({"heartbeat": {"interval": 5, "grace": 5}}, "sweep.heartbeat", "grace (5) must exceed"),
]


@pytest.mark.parametrize(("override", "key", "message"), BAD)
def test_bad_sweeps_name_the_key_and_the_problem(override: dict, key: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        _load(override)
    assert err.value.file == "s.yaml"
    assert err.value.key == key, str(err.value)
    assert message in err.value.problem, str(err.value)


def test_param_spec_errors_list_allowed_keys() -> None:
    with pytest.raises(RecipeError) as err:
        _load(_with_param("sparsity", {"float": [0.1, 0.8], "steps": 2}))
    assert err.value.key == "sweep.params.sparsity.steps"
    assert "allowed keys: float, int, choice, log, step, when, default" in err.value.problem


def test_a_sweep_recipe_takes_no_fixed_variants() -> None:
    with pytest.raises(RecipeError) as err:
        _load(variants=[{"name": "a", "pipeline": [{"int8": {}}]}])
    assert err.value.key == "variants"
    assert "sweep.seeds" in err.value.problem


def test_distillation_in_a_sweep_is_taught_by_the_baseline() -> None:
    sweep = {
        "params": {"distill": {"choice": [False, True]}},
        "pipeline": [
            {"distill": {"teacher": "other", "train": {"max_steps": 5}}, "when": {"distill": True}}
        ],
        "seeds": {},
    }
    with pytest.raises(RecipeError) as err:
        _load(sweep)
    assert err.value.key == "sweep.pipeline[0].distill.teacher"


def test_log_and_int_params() -> None:
    sweep = {
        "params": {
            "distill": {"choice": [False, True]},
            "lr": {"float": [1e-4, 1e-2], "log": True, "when": {"distill": True}},
            "steps": {"int": [5, 20], "step": 5, "when": {"distill": True}},
        },
        "pipeline": [
            {"distill": {"train": {"lr": "$lr", "max_steps": "$steps"}}, "when": {"distill": True}}
        ],
        "seeds": {"d": {"distill": True, "lr": 1e-3, "steps": 10}},
    }
    spec = _load(sweep).sweep
    assert resolve(spec, defaults(spec, spec.seeds["d"])) == [
        {"distill": {"train": {"lr": 1e-3, "max_steps": 10}}}
    ]
    with pytest.raises(RecipeError, match="log scale needs low > 0"):
        _load({**sweep, "params": {**sweep["params"], "lr": {"float": [0, 1], "log": True}}})
