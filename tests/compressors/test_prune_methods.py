"""Magnitude, Wanda and SparseGPT pruning: exact counts, N:M, and the error each minimises."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.compressors.masks import lowest, n_of_m
from compress.compressors.sequential import InputStats, output_error
from compress.compressors.sparsegpt import sparsegpt
from compress.compressors.wanda import wanda
from compress.data.calibration import CalibrationSpec
from compress.errors import CompressError
from compress.models.hf import load_pretrained
from compress.recipe import recipe_from_dict
from compress.workbench import build_variant
from tests.conftest import REPO, TINY_RECIPE

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIB = CalibrationSpec(samples=16, seq_len=64)  # fast: 1024 tokens


def _prune(model, tokens, **settings):
    cfg = REGISTRY["prune"].config_cls(**settings)
    ctx = StageContext(seed=0, tokens=tokens, calibration=CALIB)
    return run_stage("prune", copy.deepcopy(model).eval(), cfg, ctx)


def _errors(report) -> dict[str, float]:
    return {t["module"]: t["reconstruction_error"] for t in report.touched}


def _inputs(outliers: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (64, 128) and the Hessian of correlated inputs, some columns 20x larger."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    mix = torch.eye(128) + 0.3 * torch.randn(128, 128, generator=g)
    x = torch.randn(2048, 128, generator=g) @ mix
    if outliers:
        x[:, torch.randperm(128, generator=g)[:6]] *= 20
    st = InputStats(128)
    st.add(x)
    return w, st.H


def _magnitude(w: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    mask = n_of_m(w.abs(), *nm) if nm else lowest(w.abs(), round(sparsity * w.numel()))
    return w.masked_fill(mask, 0.0)


@pytest.mark.parametrize("sparsity, nm", [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_sparsegpt_beats_magnitude_on_random_inputs(sparsity, nm) -> None:
    w, H = _inputs(outliers=False)
    new = sparsegpt(w, H, sparsity, nm, blocksize=32)
    assert int((new == 0).sum()) == round(sparsity * w.numel())
    mag = output_error(w, _magnitude(w, sparsity, nm), H)
    assert output_error(w, new, H) < 0.8 * mag


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_beats_magnitude_when_some_input_channels_are_outliers(nm) -> None:
    w, H = _inputs(outliers=True)
    pruned = w.masked_fill(wanda(w, torch.diagonal(H), 0.5, nm), 0.0)
    mag = output_error(w, _magnitude(w, 0.5, nm), H)
    assert output_error(w, pruned, H) < 0.5 * mag


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_of_m_keeps_exactly_n_of_every_m(n, m) -> None:
    w, H = _inputs(outliers=True)
    for new in (
        sparsegpt(w, H, 1 - n / m, (n, m), blocksize=36),  # a block boundary inside no group
        w.masked_fill(wanda(w, torch.diagonal(H), 1 - n / m, (n, m)), 0.0),
        _magnitude(w, 1 - n / m, (n, m)),
    ):
        kept = (new != 0).reshape(64, 128 // m, m).sum(dim=-1)
        assert bool((kept == n).all())


def test_tiny_model_every_method_exact_sparsity_and_sparsegpt_below_magnitude(
    tiny_workspace,
) -> None:
    ws = tiny_workspace
    reports = {}
    for method in METHODS:
        for settings in ({"sparsity": 0.7}, {"pattern": "2:4"}):
            model, report = _prune(ws.baseline, ws.tokens, method=method, **settings)
            reports[method, tuple(settings.items())] = report
            sparsity = settings.get("sparsity", 0.5)
            for t in report.touched:  # every targeted layer, exactly
                numel = t["shape"][0] * t["shape"][1]
                assert t["zeros_after"] == round(sparsity * numel), (method, t["module"])
            if "pattern" in settings:
                for t in report.touched:
                    w = model.get_submodule(t["module"]).weight
                    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
            x = ws.tokens["test"][:256].view(2, 128)
            with torch.no_grad():
                assert torch.isfinite(model(x)).all()
    for settings in (("sparsity", 0.7),), (("pattern", "2:4"),):
        mag = _errors(reports["magnitude", settings])
        sgpt = _errors(reports["sparsegpt", settings])
        assert len(mag) == 12 and all(v is not None for v in mag.values())  # 2 blocks x 6
        for name, err in sgpt.items():
            assert err < mag[name], (settings, name, err, mag[name])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_models_prune_with_calibration(family, tiny_workspace, hf_model_dirs) -> None:
    model, _ = load_pretrained(str(hf_model_dirs[family]), REPO)
    ws = tiny_workspace
    mag = _errors(_prune(model, ws.tokens, method="magnitude")[1])
    for method in ("wanda", "sparsegpt"):
        pruned, report = _prune(model, ws.tokens, method=method)
        layers = 4 if family == "gpt2" else 7
        assert len(report.touched) == 2 * layers
        for t in report.touched:
            assert t["zeros_after"] == t["shape"][0] * t["shape"][1] // 2
            assert 0 < t["reconstruction_error"] < 1
        if method == "sparsegpt":
            assert all(e < mag[n] for n, e in _errors(report).items())
        with torch.no_grad():
            assert torch.isfinite(pruned(ws.tokens["test"][:128].view(2, 64))).all()


def test_magnitude_without_calibration_still_prunes_and_says_why_unmeasured(
    tiny_workspace,
) -> None:
    model = copy.deepcopy(tiny_workspace.baseline)
    cfg = REGISTRY["prune"].config_cls(sparsity=0.5)
    _, report = run_stage("prune", model, cfg, StageContext())
    assert report.extra["sparsity"] == 0.5
    assert "not measured" in report.extra["reconstruction_error_note"]
    with pytest.raises(CompressError, match="needs calibration tokens"):
        run_stage("prune", model, REGISTRY["prune"].config_cls(method="wanda"), StageContext())
    generic = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(CompressError, match="prune.method sparsegpt: .*layout"):
        run_stage(
            "prune",
            generic,
            REGISTRY["prune"].config_cls(method="sparsegpt", ignore=[]),
            StageContext(),
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pattern": "4:2"}, "prune.pattern: pattern 4:2: N (weights kept) must be below M"),
        ({"pattern": "2-4"}, "prune.pattern: pattern must look like N:M"),
        ({"pattern": "2:4", "sparsity": 0.7}, "pattern 2:4 fixes the sparsity at 0.5"),
        ({"method": "wanda", "scope": "global"}, "scope global ranks all layers"),
        ({"method": "wanda", "damp": 0.1}, "damp: only read by method sparsegpt"),
        ({"method": "obs"}, "prune.method: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
        ({"calibration": {"samples": 0}}, "prune.calibration.samples: Input should be greater"),
        ({"calibration": {"rows": 3}}, "prune.calibration.rows: unknown key; allowed keys: split"),
    ],
)
def test_bad_settings_name_the_key(settings, message) -> None:
    data = {"variants": [{"name": "p", "pipeline": [{"prune": settings}]}]}
    with pytest.raises(CompressError) as exc:
        recipe_from_dict(data, "r.yaml", "r")
    assert message in str(exc.value)


def test_recipe_calibration_section_reaches_the_stage_context(tiny_workspace) -> None:
    data = {
        **TINY_RECIPE,
        "calibration": {"samples": 8, "seq_len": 32, "seed": 5},
        "variants": [
            {"name": "p", "pipeline": [{"prune": {"method": "wanda"}}]},
            {"name": "q", "pipeline": [{"prune": {"calibration": {"samples": 4}}}]},
        ],
    }
    recipe = recipe_from_dict(data, "r.yaml", "r")
    assert recipe.calibration == CalibrationSpec(samples=8, seq_len=32, seed=5)
    ws = dataclasses.replace(tiny_workspace, recipe=recipe)
    models = {"baseline": ws.baseline}
    (first,) = build_variant(ws, recipe.variants[0], models)[1]
    (second,) = build_variant(ws, recipe.variants[1], models)[1]
    want = {"split": "train", "samples": 8, "seq_len": 32, "seed": 5, "tokens": 256}
    assert first.extra["calibration"] == want
    assert second.extra["calibration"] == {**want, "samples": 4, "tokens": 128}
    with pytest.raises(CompressError, match=r"r.yaml: calibration.split: Input should be"):
        recipe_from_dict({"calibration": {"split": "dev"}}, "r.yaml", "r")
    with pytest.raises(CompressError, match=r"calibration.seq_len = 512 exceeds the 'small'"):
        recipe_from_dict({"calibration": {"seq_len": 512}}, "r.yaml", "r")
