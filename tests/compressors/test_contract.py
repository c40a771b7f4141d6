"""The contract every registered compressor keeps, checked on the trained tiny baseline.

A new compressor gets these checks for free by registering; give it fast settings in
``FAST_SETTINGS`` if its defaults are slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.evaluate.memory import module_weight_bytes, param_count
from compress.recipe import recipe_from_dict, variant_stages
from compress.variant import load_variant, save_variant

FAST_SETTINGS: dict[str, dict] = {
    "distill": {"max_steps": 6, "eval_every": 3, "eval_batches": 1, "seq_len": 64},
    "finetune": {"train": {"max_steps": 6, "eval_every": 3, "eval_batches": 1, "seq_len": 64}},
    "structured": {"ratio": 0.5},
    "rtn": {"group_size": 64},  # the tiny model's 64-wide layers
}


def _leaves(model: torch.nn.Module) -> set[str]:
    return {
        n
        for n, m in model.named_modules()
        if n and not list(m.children()) and list(m.parameters(recurse=False))
    }


def _apply(ws, name: str):
    cfg = REGISTRY[name].config_cls(**FAST_SETTINGS.get(name, {}))
    model = copy.deepcopy(ws.baseline).eval()
    ctx = StageContext(seed=0, tokens=ws.tokens, models={"baseline": ws.baseline})
    return run_stage(name, model, cfg, ctx)


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def applied(request, tiny_workspace):
    name = request.param
    before = copy.deepcopy(tiny_workspace.baseline)
    model, report = _apply(tiny_workspace, name)
    x = tiny_workspace.tokens["test"][:256].view(2, 128)
    return name, before, model, report, x


def test_forward_still_works_and_is_finite(applied) -> None:
    _, before, model, _, x = applied
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, 128, before.config.vocab_size)
    assert torch.isfinite(out).all()


def test_report_matches_what_was_touched(applied) -> None:
    name, before, model, report, _ = applied
    assert report.stage == name
    assert report.touched, f"{name} touched nothing on the tiny model"
    assert report.params_before == param_count(before)
    assert report.params_after == param_count(model)
    assert report.weight_bytes_before == module_weight_bytes(before)
    # bitsandbytes 4-bit layers keep a small JSON blob of their quant state whose float text
    # can change by a few characters once a CPU forward has repacked the weights.
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert abs(report.weight_bytes_after - module_weight_bytes(model)) <= 8 * n4
    touched = {t["module"] for t in report.touched}
    skipped = {s["module"] for s in report.skipped}
    assert not touched & skipped
    assert all(s["reason"] for s in report.skipped)
    if touched != {"(whole model)"}:
        # No silent partial compression: every module with weights is touched or skipped.
        assert _leaves(before) <= touched | skipped
        out_modules = dict(model.named_modules())
        for t in report.touched:
            assert t["module"] in out_modules
            if isinstance(t.get("to"), str):
                assert type(out_modules[t["module"]]).__name__ == t["to"]
    assert report.seconds > 0


def test_saves_and_reloads_with_identical_outputs(applied, tmp_path) -> None:
    _, _, model, _, x = applied
    save_variant(model, tmp_path)
    again = load_variant(tmp_path)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


def test_seeded_runs_are_deterministic(applied, tiny_workspace) -> None:
    name, _, model, _, x = applied
    again, _ = _apply(tiny_workspace, name)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


def test_config_round_trips_through_a_recipe(applied) -> None:
    name, _, _, report, _ = applied
    text = yaml.safe_dump({"variants": [{"name": "v", "pipeline": [{name: report.config}]}]})
    recipe = recipe_from_dict(yaml.safe_load(text), "r.yaml", "r")
    (stage,) = variant_stages(recipe.variants[0])
    assert stage.name == name
    assert stage.config.model_dump() == report.config


def test_input_model_is_not_modified(tiny_workspace) -> None:
    state = {k: v.clone() for k, v in tiny_workspace.baseline.state_dict().items()}
    for name in sorted(REGISTRY):
        _apply(tiny_workspace, name)
    for k, v in tiny_workspace.baseline.state_dict().items():
        assert torch.equal(v, state[k]), f"baseline tensor {k} changed"
