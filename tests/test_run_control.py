"""Compute-matched controls: a variant that trains is compared with the baseline trained the
same way, computed once per budget and cached."""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import yaml

from compress import run as run_mod
from compress import workbench
from compress.compressors import StageReport
from compress.control import building_control, control_stages, entry_path, write_control
from compress.recipe import recipe_from_dict, variant_stages

TRAIN = {
    "max_steps": 8,
    "batch_size": 4,
    "seq_len": 64,
    "lr": 0.003,
    "warmup_steps": 2,
    "eval_every": 4,
    "eval_batches": 1,
    "early_stop_patience": None,
}
DISTILL = {"teacher": "baseline", "alpha": 0.5, "temperature": 2.0, "train": TRAIN}
CHANGES = ({"max_steps": 9}, {"lr": 0.001}, {"seq_len": 32})


def _recipe(tiny_recipe_dict: dict) -> dict:
    recipe = copy.deepcopy(tiny_recipe_dict)
    recipe["name"] = "controls"
    recipe["eval"]["memory"] = {"peak_rss": False}
    recipe["eval"]["latency"].update(repeats=3, max_seconds=2)
    recipe["variants"] = [
        {"name": "pruned", "pipeline": [{"prune": {"sparsity": 0.5}}]},
        {"name": "recovered", "from": "pruned", "pipeline": [{"distill": DISTILL}]},
        # the same training budget: the same control, measured once
        {"name": "recovered2", "from": "pruned", "pipeline": [{"distill": DISTILL}]},
        {"name": "int8", "pipeline": [{"int8": {}}]},
    ]
    return recipe


@pytest.fixture(scope="module")
def control_runs(tmp_path_factory, tiny_workspace, tiny_recipe_dict):
    """The recipe run twice; the second run must read the control from the cache."""
    tmp = tmp_path_factory.mktemp("controls")
    path = tmp / "controls.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_recipe_dict)))
    built: list[list[str]] = []
    real = workbench._run_stages

    def counting(ws, name, model, stages, models, progress):
        built.append([name, *(s.name for s in stages)])
        return real(ws, name, model, stages, models, progress)

    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workbench, "_run_stages", counting)
        for i in range(2):
            report = tmp / f"report{i}"
            code = run_mod.main([str(path), "--report-dir", str(report), "--no-progress"])
            rows = json.loads((report / "results.json").read_text())["rows"]
            out.append((code, report, rows, list(built)))
            built.clear()
    return out


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["variant"]: r for r in rows}


def test_distill_variant_gets_one_control_row_that_differs_from_the_baseline(control_runs):
    code, report, rows, built = control_runs[0]
    assert code == 0
    assert [r["variant"] for r in rows] == [
        "baseline",
        "pruned",
        "recovered",
        "recovered-control",
        "recovered2",
        "int8",
    ]
    by = _by_name(rows)
    ctl = by["recovered-control"]
    assert ctl["role"] == "control" and ctl["status"] == "ok"
    assert re.fullmatch(r"control: distill \d+ steps", ctl["stages"]), ctl["stages"]
    assert ctl["sparsity"] < 0.01  # the uncompressed baseline, trained
    base = by["baseline"]
    assert base["role"] == "baseline"
    # trained for 8 more steps: not the baseline any more
    assert ctl["perplexity"] != pytest.approx(base["perplexity"], rel=1e-6)
    # trained once for both variants with this budget (and the two variants themselves)
    assert built.count(["control", "distill"]) == 1
    for name in ("recovered", "recovered2"):
        r = by[name]
        assert r["control"] == "recovered-control"
        assert r["control_perplexity"] == pytest.approx(ctl["perplexity"])
        assert r["perplexity_control_ratio"] == pytest.approx(r["perplexity"] / ctl["perplexity"])
        assert r["ppl_delta_control"] == pytest.approx(r["perplexity"] - ctl["perplexity"])
        assert r["ppl_delta_control_lo"] <= r["ppl_delta_control"] <= r["ppl_delta_control_hi"]
        assert isinstance(r["ppl_control_within_noise"], bool)
    html = (report / "report.html").read_text()
    assert "recovered-control" in html and "vs control" in html


def test_variants_that_do_not_train_have_no_control(control_runs):
    _, _, rows, _ = control_runs[0]
    by = _by_name(rows)
    for name in ("baseline", "pruned", "int8"):
        assert by[name]["control"] is None
        assert by[name]["control_perplexity"] is None
        assert by[name]["ppl_delta_control"] is None


def test_second_run_reads_the_control_from_the_cache(control_runs):
    (_, _, first, _), (code, _, second, built) = control_runs
    assert code == 0
    assert ["control", "distill"] not in built  # not trained again
    assert built.count(["recovered", "distill"]) == 1  # the variant itself still trains
    a, b = _by_name(first)["recovered-control"], _by_name(second)["recovered-control"]
    assert b["perplexity"] == a["perplexity"]


def test_a_damaged_control_entry_is_trained_again(tiny_workspace, caplog):
    ws = tiny_workspace
    stages, key = workbench.control_for(
        ws, _stages([{"distill": {**DISTILL, "train": {**TRAIN, "max_steps": 3}}}])
    )
    first = workbench.build_control(ws, stages, key)
    weights = entry_path(key) / "model.safetensors"
    assert weights.is_file()
    assert workbench.build_control(ws, stages, key).cached is True
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = workbench.build_control(ws, stages, key)
    assert again.cached is False and first.cached is False
    assert "cached control" in caplog.text and "does not match its checksum" in caplog.text
    assert workbench.build_control(ws, stages, key).cached is True


def test_a_control_another_process_is_training_is_waited_for_and_read(tiny_workspace, caplog):
    # the lock is taken by its own open file, as another process would hold it
    ws = tiny_workspace
    stages, key = workbench.control_for(
        ws, _stages([{"distill": {**DISTILL, "train": {**TRAIN, "max_steps": 2}}}])
    )
    held, release = threading.Event(), threading.Event()
    trained: list[Path] = []

    def other_process() -> None:
        with building_control(key):
            held.set()
            release.wait(timeout=600)
            model = copy.deepcopy(ws.baseline)
            trained.append(write_control(key, model, [StageReport(stage="distill", config={})]))

    holder = threading.Thread(target=other_process)
    holder.start()
    assert held.wait(timeout=600)
    result: list = []
    waiter = threading.Thread(
        target=lambda: result.append(workbench.build_control(ws, stages, key))
    )
    try:
        with caplog.at_level(logging.INFO, logger="compress.control"):
            waiter.start()
            while "being trained by another process" not in caplog.text and waiter.is_alive():
                time.sleep(0.01)
            assert not result, "built while another process held the control"
    finally:
        release.set()
        holder.join(timeout=600)
        waiter.join(timeout=600)
    (ctl,) = result
    assert ctl.cached is True and ctl.path == trained[0]  # read, not trained a second time
    assert [r.stage for r in ctl.reports] == ["distill"] and ctl.reports[0].curve == []


def _stages(pipeline: list[dict]):
    recipe = recipe_from_dict(
        {"name": "k", "variants": [{"name": "v", "pipeline": pipeline}]}, "k.yaml", "k"
    )
    return variant_stages(recipe.variants[0])


def test_control_stages_train_the_baseline_the_same_way(tiny_workspace):
    student = {**DISTILL, "student": {"n_layer": 1}, "teacher": "baseline"}
    stages = control_stages(
        _stages([{"prune": {"sparsity": 0.5}}, {"distill": student}, {"int8": {}}])
    )
    assert [s.name for s in stages] == ["distill"]
    cfg = stages[0].config
    assert cfg.student == "current" and cfg.teacher == "baseline"
    assert cfg.keep_sparsity is False
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.seq_len, cfg.alpha) == (8, 0.003, 64, 0.5)
    assert cfg.given_train() == TRAIN  # still only what was given: the rest is the run's
    assert control_stages(_stages([{"prune": {"sparsity": 0.5}}, {"int8": {}}])) == []
    ws = tiny_workspace
    key = workbench.control_for(ws, _stages([{"distill": DISTILL}]))[1]
    # keep_sparsity means nothing for the uncompressed baseline: the same control
    same = {**DISTILL, "keep_sparsity": False}
    assert workbench.control_for(ws, _stages([{"distill": same}]))[1] == key
    others = [{**DISTILL, "train": {**TRAIN, **change}} for change in CHANGES]
    others.append({**DISTILL, "alpha": 1.0})
    for other in others:
        assert workbench.control_for(ws, _stages([{"distill": other}]))[1] != key, other
    # a training key left out takes the run's value, so the key follows the run's value
    other_run = copy.copy(ws)
    other_run.recipe = ws.recipe.model_copy(
        update={"train": ws.recipe.train.model_copy(update={"lr": 1e-4})}
    )
    no_lr = {**DISTILL, "train": {k: v for k, v in TRAIN.items() if k != "lr"}}
    for stage, same_key in ((DISTILL, True), (no_lr, False)):
        keys = [workbench.control_for(w, _stages([{"distill": stage}]))[1] for w in (ws, other_run)]
        assert (keys[0] == keys[1]) is same_key, stage
    ft = workbench.control_for(ws, _stages([{"finetune": {"train": {"max_steps": 8}}}]))
    assert ft is not None and ft[1] != key
    two = workbench.control_for(
        ws, _stages([{"distill": DISTILL}, {"finetune": {"train": {"max_steps": 8}}}])
    )
    assert [s.name for s in two[0]] == ["distill", "finetune"]


def test_terminal_summary_shows_the_difference_to_the_control() -> None:
    rows = [
        {"variant": "baseline", "status": "ok", "perplexity": 129.3, "role": "baseline"},
        {
            "variant": "rec",
            "status": "ok",
            "perplexity": 111.5,
            "role": "variant",
            "control": "rec-control",
            "perplexity_control_ratio": 1.0054,
            "ppl_delta_control": 0.6,
            "ppl_delta_control_lo": -0.2,
            "ppl_delta_control_hi": 1.4,
            "ppl_control_within_noise": True,
        },
        {"variant": "rec-control", "status": "ok", "perplexity": 110.9, "role": "control"},
    ]
    lines = run_mod.summary_table(rows).splitlines()
    assert "ppl - ctrl [95% CI]" in lines[0]
    assert max(len(line) for line in lines) <= 80
    rec = next(line for line in lines if line.startswith("rec "))
    assert "+0.60 [-0.20,+1.40]~" in rec
    ctl = next(line for line in lines if line.startswith("rec-control"))
    assert " control " in ctl
    base = next(line for line in lines if line.startswith("baseline"))
    assert "control" not in base
