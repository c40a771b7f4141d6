"""Quantizers on the trained tiny baseline: quality and bytes asserted numerically."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compress.compressors import REGISTRY, StageContext, run_stage
from compress.errors import CompressError
from compress.evaluate.perplexity import perplexity
from compress.variant import load_variant, save_variant


@pytest.fixture(scope="module")
def base(tiny_workspace):
    ws = tiny_workspace
    ids = ws.tokens["test"][:8192]
    ref = perplexity(ws.baseline, ids, 128).perplexity
    return ws, ids, ref


def _apply(ws, name: str, **settings):
    model = copy.deepcopy(ws.baseline).eval()
    cfg = REGISTRY[name].config_cls(**settings)
    return run_stage(name, model, cfg, StageContext(seed=0, tokens=ws.tokens))


def test_int8_is_near_lossless_and_four_times_smaller(base) -> None:
    ws, ids, ref = base
    model, report = _apply(ws, "int8")
    ppl = perplexity(model, ids, 128).perplexity
    assert abs(ppl / ref - 1) < 0.01, (ppl, ref)
    assert report.touched_bytes_after / report.touched_bytes_before <= 0.3
    assert 8.0 < report.extra["bits_per_weight"] < 8.5  # int8 codes + one fp32 scale per row
    n_layers = ws.baseline.config.n_layer
    assert len(report.touched) == 6 * n_layers  # q, k, v, o, fc_in, fc_out per block
    assert all(t["to"] == "Linear8bitLt" for t in report.touched)
    assert report.weight_bytes_after < report.weight_bytes_before


def test_int8_skips_are_reported_with_reasons(base) -> None:
    ws, _, _ = base
    _, report = _apply(ws, "int8")
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    assert "ignored by selector 'lm_head'" == reasons["lm_head"]
    assert "Embedding" in reasons["tok_emb"] and "LayerNorm" in reasons["ln_f"]
    # Every leaf module with parameters is either touched or skipped, none silently.
    leaves = {
        n
        for n, m in ws.baseline.named_modules()
        if n and not list(m.children()) and list(m.parameters(recurse=False))
    }
    assert leaves == set(reasons) | {t["module"] for t in report.touched}


def test_tied_lm_head_is_skipped_when_not_ignored(base) -> None:
    ws, _, _ = base
    _, report = _apply(ws, "int8", ignore=[])
    reasons = {s["module"]: s["reason"] for s in report.skipped}
    assert reasons["lm_head"] == "weight tied to tok_emb"


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_four_bit_costs_some_perplexity_and_saves_more(base, quant) -> None:
    ws, ids, ref = base
    model, report = _apply(ws, quant)
    ppl = perplexity(model, ids, 128).perplexity
    assert 0.999 * ref < ppl < 1.10 * ref, (ppl, ref)  # lossy, but not broken
    ratio = report.touched_bytes_after / report.touched_bytes_before
    assert ratio <= 0.2, ratio
    # Tiny layers carry bitsandbytes' fixed per-layer maps, so bits/weight is above 4.13 here.
    assert 4.0 < report.extra["bits_per_weight"] < 6.0


@pytest.mark.parametrize("double_quant,low,high", [(True, 4.12, 4.14), (False, 4.49, 4.51)])
def test_nf4_bits_per_weight_on_a_large_layer(double_quant, low, high) -> None:
    # QLoRA: NF4 with blocksize 64 costs 4 + 32/64 = 4.5 bits/weight, ~4.127 with double quant
    # (bitsandbytes' plain layout; the packed CPU layout is tested in test_bnb_cpu.py).
    model = nn.Sequential(nn.Linear(1024, 1024))
    cfg = REGISTRY["nf4"].config_cls(ignore=[], double_quant=double_quant, cpu_kernel="plain")
    _, report = run_stage("nf4", model, cfg, StageContext())
    assert low < report.extra["bits_per_weight"] < high, report.extra


def test_nf4_beats_fp4_and_int8_beats_both(base) -> None:
    ws, ids, _ = base
    nll = {q: perplexity(_apply(ws, q)[0], ids, 128).nll for q in ("int8", "nf4", "fp4")}
    assert nll["int8"] < nll["nf4"] < nll["fp4"], nll


def test_targets_select_a_subset(base) -> None:
    ws, _, _ = base
    _, report = _apply(ws, "int8", targets=["re:blocks\\.0\\.mlp\\..*"])
    assert sorted(t["module"] for t in report.touched) == [
        "blocks.0.mlp.fc_in",
        "blocks.0.mlp.fc_out",
    ]
    assert {"module": "blocks.1.mlp.fc_in", "reason": "not targeted"} in report.skipped


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"targets": ["q_projj"]}, "'q_projj' matches no module"),
        ({"ignore": ["nothing_here"]}, "'nothing_here' matches no module"),
        ({"targets": ["re:("]}, "invalid regex"),
    ],
)
def test_bad_selectors_are_errors(base, settings, match) -> None:
    ws, _, _ = base
    with pytest.raises(CompressError, match=match):
        _apply(ws, "int8", **settings)


@pytest.mark.parametrize("quant", ["int8", "nf4", "fp4"])
def test_quantized_variant_saves_and_reloads_identically(base, quant, tmp_path) -> None:
    ws, ids, _ = base
    model, _ = _apply(ws, quant)
    save_variant(model, tmp_path)
    again = load_variant(tmp_path)
    x = ids[:256].view(2, 128)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))
    assert all(type(a) is type(b) for a, b in zip(model.modules(), again.modules()))


def test_quantization_is_deterministic(base) -> None:
    ws, ids, _ = base
    x = ids[:128].view(1, 128)
    with torch.inference_mode():
        a = _apply(ws, "nf4")[0](x)
        b = _apply(ws, "nf4")[0](x)
    assert torch.equal(a, b)


def test_registry_has_the_quantizers() -> None:
    assert {"int8", "nf4", "fp4"} <= set(REGISTRY)
    for comp in REGISTRY.values():
        assert comp.summary, f"{comp.name} has no docstring summary"
        comp.config_cls()  # defaults are valid


def test_quantizing_a_plain_module_tree() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    q, report = run_stage("int8", model, REGISTRY["int8"].config_cls(ignore=[]), StageContext())
    assert [t["module"] for t in report.touched] == ["0", "2"]
    assert report.params_after == report.params_before


def test_quantizing_twice_is_an_error_that_says_why(base) -> None:
    ws, _, _ = base
    model, _ = _apply(ws, "int8")
    n = 6 * ws.baseline.config.n_layer
    with pytest.raises(
        CompressError,
        match=rf"^nf4: converts no layer \(every candidate was skipped: {n}x Linear8bitLt weight "
        r"is torch.int8, already quantized; .*\); check targets/ignore$",
    ):
        run_stage("nf4", model, REGISTRY["nf4"].config_cls(), StageContext())
    assert type(model.blocks[0].mlp.fc_in).__name__ == "Linear8bitLt"


@pytest.mark.parametrize("stage", ["prune", "int8", "nf4", "dynamic-int8", "rtn"])
def test_targets_that_leave_nothing_to_convert_are_an_error(base, stage) -> None:
    ws, _, _ = base
    cfg = REGISTRY[stage].config_cls(targets=["q_proj"], ignore=["q_proj"])
    before = {k: v.clone() for k, v in ws.baseline.state_dict().items()}
    model = copy.deepcopy(ws.baseline)
    with pytest.raises(
        CompressError,
        match=rf"^{stage}: converts no layer \(every candidate was skipped: .*"
        rf"{ws.baseline.config.n_layer}x ignored by selector 'q_proj'",
    ):
        run_stage(stage, model, cfg, StageContext())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
