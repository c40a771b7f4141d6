"""A sweep's perplexity reference (the baseline or each trial's compute-matched control), the
noise flag on every trial's record, and a study that never mixes a partial baseline with the
finished one."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from compress import run as run_mod
from compress.errors import RecipeError
from compress.recipe import recipe_from_dict
from compress.sweep.objective import config_key
from compress.sweep.space import default_recommendations
from compress.sweep.study import _compress_attrs, recorded
from tests.sweep.conftest import slow_sweep_recipe, sweep_recipe, write_recipe


def _load(recipe: dict):
    return recipe_from_dict(recipe, "s.yaml", "s").sweep


def test_reference_defaults_to_the_baseline() -> None:
    spec = _load(slow_sweep_recipe(constraints=[{"metric": "perplexity_ratio", "max": 1.1}]))
    assert spec.reference == "baseline"
    assert [c.metric for c in spec.constraints] == ["perplexity_ratio"]


def test_reference_control_compares_perplexity_with_the_control() -> None:
    spec = _load(
        slow_sweep_recipe(
            reference="control",
            objectives=["perplexity_ratio", "latency_ratio"],
            constraints=[{"metric": "perplexity_ratio", "max": 1.1}],
        )
    )
    assert spec.objectives == ["perplexity_control_ratio", "latency_ratio"]
    assert [c.metric for c in spec.constraints] == ["perplexity_control_ratio"]
    plain = _load(slow_sweep_recipe(reference="control"))
    wheres = [r.where for r in default_recommendations(plain)]
    assert wheres and all(list(w) == ["perplexity_control_ratio"] for w in wheres)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (sweep_recipe(reference="control"), "needs a stage that trains"),
        (slow_sweep_recipe(reference="controls"), "sweep.reference: Input should be 'baseline'"),
        (
            slow_sweep_recipe(
                reference="control", constraints=[{"metric": "latency_ratio", "max": 1.0}]
            ),
            "none names it",
        ),
    ],
)
def test_bad_reference_is_one_line_naming_the_key(recipe: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(recipe, "s.yaml", "s")
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("s.yaml: sweep")


@pytest.mark.slow
def test_a_control_referenced_sweep_records_each_trials_control(tmp_path, tiny_workspace):
    recipe = slow_sweep_recipe(
        reference="control",
        trials=3,
        constraints=[{"metric": "perplexity_ratio", "max": 2.0}],
    )
    recipe["sweep"]["seeds"] = {"prune50": recipe["sweep"]["seeds"]["prune50"]}
    recipe["sweep"]["seeds"]["int8"] = {"quantizer": "int8"}
    path = write_recipe(tmp_path / "s.yaml", recipe)
    out = tmp_path / "out"
    assert run_mod.main([str(path), "--report-dir", str(out), "--no-progress"]) == 0
    study = optuna.load_study(study_name="tiny-sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    trials = {t.user_attrs.get("seed"): t.user_attrs for t in study.get_trials()}
    base, pruned, int8 = trials["baseline"], trials["prune50"], trials["int8"]
    # no training: the control is the baseline
    assert int8["control_perplexity"] == pytest.approx(base["perplexity"])
    assert int8["perplexity_control_ratio"] == pytest.approx(int8["perplexity_ratio"])
    # prune + distill: the baseline distilled with the same budget, not the baseline
    assert pruned["control_perplexity"] != pytest.approx(base["perplexity"], rel=1e-6)
    # each of the three user attributes keeps 6 significant digits (report.study.SIGNIFICANT)
    assert pruned["perplexity_control_ratio"] == pytest.approx(
        pruned["perplexity"] / pruned["control_perplexity"], rel=2e-5
    )
    measured = {t.user_attrs.get("seed"): recorded(t, "measured") for t in study.get_trials()}
    for seed, attrs in (("baseline", base), ("prune50", pruned), ("int8", int8)):
        assert isinstance(attrs["latency_noisy"], bool)  # the flag every trial line can show
        assert measured[seed]["latency_noisy"] == attrs["latency_noisy"]


def test_a_partial_baseline_is_another_baseline_for_the_study(tiny_workspace) -> None:
    ws = tiny_workspace
    info = ws.baseline_info
    assert not info.partial and info.identity == info.key
    train = {**info.train, "partial": True, "steps": 50, "planned_steps": info.train["steps"]}
    partial = dataclasses.replace(ws, baseline_info=dataclasses.replace(info, train=train))
    assert partial.baseline_info.key == info.key  # the cache entry's name: the same
    assert partial.baseline_info.identity != info.identity
    # trials measured against either never share a result, and a study made for one refuses
    # workers of the other (open_study compares these attributes)
    assert config_key(partial, []) != config_key(ws, [])
    spec = _load(sweep_recipe())
    mine = _compress_attrs(ws.recipe, ws, spec)["baseline_key"]
    assert _compress_attrs(ws.recipe, partial, spec)["baseline_key"] != mine
    resumed = {**train, "steps": 60}
    other = dataclasses.replace(info, train=resumed)
    assert other.identity != partial.baseline_info.identity
