"""The per-layer sensitivity scan: what it ranks, what it caches, what it writes."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from compress.cache import cache_dir
from compress.scan.measure import cached_scan, rtn_simulated, scan_model
from compress.scan.spec import ScanSpec

SPEC = ScanSpec(tokens=1024, prune={"sparsities": [0.5, 0.9]}, quantize={"bits": [4]})


def _scan(ws, model, spec=SPEC, **kw):
    return scan_model(model, ws.tokens, spec, 128, **kw)


def test_scan_ranks_a_layer_made_sensitive_first(tiny_workspace):
    """A function-preserving rescale makes one layer's weight magnitudes lie: the columns of
    the last block's ``fc_in`` are multiplied by factors spread over four decades and its
    input LayerNorm divided by them. The model computes the same, but magnitude pruning of
    that layer now removes the columns that matter most, so the scan must rank it first."""
    ws = tiny_workspace
    model = copy.deepcopy(ws.baseline)
    block = model.blocks[-1]
    victim = f"blocks.{len(model.blocks) - 1}.mlp.fc_in"
    g = torch.Generator().manual_seed(0)
    d = 10 ** (torch.rand(block.ln_2.weight.numel(), generator=g) * 4 - 2)  # (C,)
    with torch.no_grad():
        block.mlp.fc_in.weight.mul_(d[None, :])
        block.ln_2.weight.div_(d)
        block.ln_2.bias.div_(d)
    ids = ws.tokens["valid"][:1024]
    from compress.evaluate.perplexity import perplexity

    same = perplexity(model, ids, 128).perplexity, perplexity(ws.baseline, ids, 128).perplexity
    assert same[0] == pytest.approx(same[1], rel=1e-4)
    result = _scan(ws, model)
    ranking = result.ranking("prune magnitude 0.5")
    assert ranking[0] == victim, [(n, result.delta(n, "prune magnitude 0.5")) for n in ranking]
    before = _scan(ws, ws.baseline)
    assert before.ranking("prune magnitude 0.5")[0] != victim  # it was not first before


def test_scan_restores_every_weight_and_measures_harm(tiny_workspace):
    model = tiny_workspace.baseline
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _scan(tiny_workspace, model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(result.rows) == len(result.layers) * 3
    # each row is its own measurement against the same baseline, and some layer is hurt
    for r in result.rows:
        assert r["delta"] == pytest.approx(r["perplexity"] - result.baseline_perplexity)
    assert max(result.delta(n, "prune magnitude 0.9") for n in result.layers) > 0
    assert any(r["simulated"] and "(simulated)" in r["setting"] for r in result.rows)


def test_rtn_simulated_error_shrinks_with_bits():
    w = torch.randn(16, 256)
    errors = [float((rtn_simulated(w, b, 128) - w).pow(2).mean()) for b in (8, 4, 3, 2)]
    assert errors == sorted(errors)
    assert errors[0] < 1e-4
    assert rtn_simulated(w, 8, 128).unique().numel() > 256  # per-group scales


def test_cached_scan_is_reused_and_keyed_by_settings(tiny_workspace, monkeypatch):
    import compress.scan.measure as measure

    ws = tiny_workspace
    calls = []
    real = measure.scan_model
    monkeypatch.setattr(measure, "scan_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = ScanSpec(tokens=512, prune={"sparsities": [0.5]}, quantize=None)
    first = cached_scan(ws.baseline, ws.tokens, spec, 128, "k", fingerprint="f")
    second = cached_scan(ws.baseline, ws.tokens, spec, 128, "k", fingerprint="f")
    assert len(calls) == 1 and second.cached and not first.cached
    assert second.rows == first.rows
    other = spec.model_copy(update={"tokens": 768})
    cached_scan(ws.baseline, ws.tokens, other, 128, "k", fingerprint="f")
    assert len(calls) == 2  # other settings: measured again
    cached_scan(ws.baseline, ws.tokens, spec, 128, "other-baseline", fingerprint="f")
    assert len(calls) == 3  # another baseline: measured again
    # a corrupted entry is measured again, not used
    path = cache_dir() / "scan" / f"{first.key}.json"
    path.write_text(path.read_text().replace('"rows"', '"rowz"'))
    third = cached_scan(ws.baseline, ws.tokens, spec, 128, "k", fingerprint="f")
    assert len(calls) == 4 and not third.cached


def test_wanda_scan_reads_input_statistics(tiny_workspace):
    spec = ScanSpec(tokens=512, prune={"method": "wanda", "sparsities": [0.7]}, quantize=None)
    ws = tiny_workspace
    res = _scan(
        ws, ws.baseline, spec, calibration=ws.recipe.calibration.model_copy(update={"samples": 8})
    )
    assert {r["method"] for r in res.rows} == {"wanda"}
    assert all(r["delta"] == r["delta"] for r in res.rows)


def test_scan_on_hf_families(tiny_workspace, tmp_path):
    """Every linear layer of each Hugging Face family is scanned (GPT-2's Conv1D layers as
    the linear layers they are converted to); untrained models keep this fast."""
    transformers = pytest.importorskip("transformers")
    from compress.recipe import VariantSpec, recipe_from_dict
    from compress.scan.workspace import scan_workspace
    from compress.workbench import build_variant, prepare
    from tests.conftest import REPO, hf_recipe
    from tests.hf_models import FAMILIES, config, save_model_dir

    for family in FAMILIES:
        torch.manual_seed(0)
        cfg = config(family, tiny_workspace.tokenizer.vocab_size)
        hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        path = save_model_dir(hf, tiny_workspace.tokenizer, tmp_path / family)
        scan = {"tokens": 256, "prune": {"sparsities": [0.7]}, "quantize": {"bits": [4]}}
        ws = prepare(recipe_from_dict(hf_recipe(path, scan=scan)), REPO, progress=False)
        res = scan_workspace(ws)
        linears = {
            n
            for n, m in ws.baseline.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        }
        assert set(res.layers) == linears and len(linears) >= 8, family
        assert len(res.rows) == 2 * len(linears)
        assert max(r["delta"] for r in res.rows) > 0, family
        # a variant allocates from that scan at exactly the overall sparsity asked for
        spec = VariantSpec(
            name="v", pipeline=[{"prune": {"sparsity": 0.5, "allocation": "scan-optimal"}}]
        )
        _, (report,) = build_variant(ws, spec, {"baseline": ws.baseline})
        total = sum(t["shape"][0] * t["shape"][1] for t in report.touched)
        assert report.extra["pruned_weights"] == round(0.5 * total), family
        assert len({round(t["sparsity"], 3) for t in report.touched}) > 1, family


def test_cli_writes_csv_json_html_and_caches(tiny_recipe_dict, tmp_path, capsys):
    import yaml

    from compress.scan.__main__ import main

    recipe = {
        **tiny_recipe_dict,
        "scan": {"tokens": 512, "prune": {"sparsities": [0.5]}, "quantize": {"bits": [4]}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main([str(path), "--report-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scan [1/" in printed  # progress lines
    rows = list(csv.DictReader((out / "scan.csv").open()))
    data = json.loads((out / "scan.json").read_text())
    assert len(rows) == len(data["scan"]["layers"]) * 2
    page = (out / "scan.html").read_text()
    assert "<svg" in page and "(simulated)" in page and "<script" not in page
    assert main([str(path), "--report-dir", str(out)]) == 0
    assert "scan: cached" in capsys.readouterr().out


@pytest.mark.parametrize(
    "scan, key",
    [
        ({"prune": {"sparsities": [1.5]}}, "scan.prune.sparsities"),
        ({"tokens": 10}, "scan.tokens"),
        ({"prune": None, "quantize": None}, "scan"),
        ({"bogus": 1}, "scan.bogus"),
    ],
)
def test_cli_bad_recipe_is_one_line_exit_2(tiny_recipe_dict, tmp_path, capsys, scan, key):
    import yaml

    from compress.scan.__main__ import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe_dict, "scan": scan}))
    assert main([str(path), "--report-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"bad.yaml: {key}" in err, err


def test_scan_then_run_of_one_recipe_both_succeed_and_the_run_shows_the_scan(
    tiny_recipe_dict, tmp_path, monkeypatch, capsys
):
    """The scan writes beside the run's report folder (a run replaces its folder whole), and
    the run's report carries the heat map when a variant allocated from the scan."""
    import yaml

    from compress import run as run_mod
    from compress.scan.__main__ import main

    recipe = {
        **tiny_recipe_dict,
        "name": "scanrun",
        "scan": {"tokens": 512, "prune": {"sparsities": [0.5]}, "quantize": None},
        "variants": [
            {"name": "dense1", "pipeline": [{"prune": {"allocation": "scan-dense"}}]},
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    assert main([str(path), "--no-progress"]) == 0
    assert (tmp_path / "reports" / "scanrun-scan" / "scan.html").exists()
    assert run_mod.main([str(path), "--no-progress"]) == 0
    page = (tmp_path / "reports" / "scanrun" / "report.html").read_text()
    assert "Sensitivity scan of the baseline" in page and "per 1,000 pruned weights" in page
    assert (tmp_path / "reports" / "scanrun-scan" / "scan.html").exists()  # left alone


def _result(rows: list[tuple[str, float, float, float]]):
    from compress.scan.measure import ScanResult

    layers = list(dict.fromkeys(r[0] for r in rows))
    return ScanResult(
        baseline_perplexity=30.0,
        tokens=4096,
        split="valid",
        seq_len=128,
        layers=layers,
        numel={n: 100 for n in layers},
        blocks={n: 0 for n in layers},
        settings=["prune magnitude 0.5"],
        rows=[
            {
                "layer": n,
                "setting": "prune magnitude 0.5",
                "kind": "prune",
                "value": 0.5,
                "delta": d,
                "delta_lo": lo,
                "delta_hi": hi,
            }
            for n, d, lo, hi in rows
        ],
    )


def test_a_scan_of_mostly_noise_says_so_and_a_clear_one_does_not():
    clear = [("a", 2.0, 1.5, 2.5), ("b", 0.5, 0.2, 0.8), ("c", 0.1, -0.1, 0.3)]
    assert _result([*clear, ("d", 1.0, 0.5, 1.5)]).noise_note(0.5) is None
    noise = _result([("a", 2.0, 1.5, 2.5), ("b", 0.1, -0.2, 0.4), ("c", -0.1, -0.3, 0.1)])
    note = noise.noise_note(0.5)
    assert "2 of 3 layers" in note and "not clear increases" in note and "scan.tokens" in note
    # one of four layers lowers perplexity beyond noise when pruned alone: not trained out
    lowered = _result([*clear, ("d", -0.5, -0.8, -0.2)]).noise_note(0.5)
    assert "pruning 1 of 4 layers alone lowered" in lowered


def test_every_scanned_increase_has_its_interval(tiny_workspace):
    from compress.scan.measure import scan_model
    from compress.scan.spec import ScanSpec

    ws = tiny_workspace
    spec = ScanSpec(tokens=1024, prune={"sparsities": [0.9]}, quantize=None)
    res = scan_model(ws.baseline, ws.tokens, spec, 64)
    for r in res.rows:
        assert r["delta_lo"] <= r["delta"] <= r["delta_hi"]
        assert r["delta_hi"] > r["delta_lo"]
    # pruning 90% of a layer is beyond noise for some layers even on the tiny baseline
    assert any(r["delta_lo"] > 0 for r in res.rows)
