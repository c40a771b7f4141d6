"""Tests for compress.report.sweep: Pareto front, recommendations, seed comparison, files."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pandas as pd
import pytest

from compress.report import (
    pareto_front,
    pareto_trials,
    recommend,
    seed_comparison,
    write_sweep_report,
)
from compress.report.sweep import METRIC_KEYS

EVIL = "<script>alert(1)</script>"
CHART = '<svg role="img"'  # an inline SVG chart
OBJECTIVES = [
    ("perplexity", "perplexity"),
    ("latency_ratio", "latency (x baseline)"),
    ("weight_bytes", "weight bytes"),
]
BASE_PPL = 40.0


def trial(
    number: int,
    ppl: float | None,
    lat: float | None,
    wb: float | None,
    *,
    seed: str | None = None,
    state: str = "COMPLETE",
    feasible: bool = True,
    stages: str = "",
    params: dict | None = None,
    error: str | None = None,
    cached_from: str | None = None,
    config_key: str | None = None,
) -> dict:
    complete = state == "COMPLETE"
    values = {"perplexity": ppl, "latency_ratio": lat, "weight_bytes": wb} if complete else None
    return {
        "number": number,
        "state": state,
        "seed": seed,
        "params": params or {},
        "stages": stages,
        "pipeline": [{"prune": {"sparsity": 0.5}}, {"dynamic-int8": {"lm_head": True}}]
        if stages
        else [],
        "values": values,
        "feasible": feasible,
        "perplexity": ppl,
        "perplexity_ratio": None if ppl is None else ppl / BASE_PPL,
        "latency_ms": None if lat is None else 10.0 * lat,
        "latency_baseline_ms": 10.0,
        "latency_ratio": lat,
        "weight_bytes": wb,
        "weight_bytes_ratio": None if wb is None else wb / 16e6,
        "error": error,
        "cached_from": cached_from,
        "seconds": 12.5,
        "worker": "w0",
        "config_key": config_key or f"key-{number}",
    }


def hand_trials() -> list[dict]:
    """Small sweep with a known answer. Front: 0, 4, 5, 9, 11, 12."""
    return [
        trial(0, 40.0, 1.0, 16e6, seed="baseline"),
        trial(1, 41.0, 0.8, 5e6, seed="int8", stages="int8(threshold 6.0)"),
        trial(2, 44.0, 1.3, 3e6, seed="nf4", stages="nf4(blocksize 64)", feasible=False),
        trial(
            3,
            None,
            None,
            None,
            seed="prune50",
            stages="prune(0.5)",
            state="FAIL",
            error=f"RuntimeError: out of memory {EVIL}",
        ),
        trial(4, 40.5, 0.6, 6e6, seed="cpu-int8", stages="dynamic-int8(lm_head)"),
        trial(5, 40.8, 0.5, 4e6, stages="prune(0.3) -> int8", params={"sparsity": 0.3}),
        trial(6, 40.9, 0.7, 4.5e6, stages="prune(0.2) -> int8", params={"sparsity": 0.2}),
        # Would dominate everything, but breaks a constraint: never on the front or picked.
        trial(7, 35.0, 0.3, 1e6, stages="magic", params={"sparsity": 0.9}, feasible=False),
        # FAIL with stale numbers: never on the front.
        {**trial(8, 1.0, 0.1, 1.0, stages="broken"), "state": "FAIL", "error": "ValueError: x"},
        trial(9, 40.2, 0.55, 7e6, stages=f"dynamic-int8 {EVIL}", params={"method": EVIL}),
        trial(10, None, None, None, state="RUNNING", params={"sparsity": 0.4}),
        # An exact duplicate of trial 5 (a cached result): both stay on the front.
        trial(
            11,
            40.8,
            0.5,
            4e6,
            stages="prune(0.3) -> int8",
            params={"sparsity": 0.3},
            cached_from="trial 5",
            config_key="key-5",
        ),
        trial(12, 40.6, 0.9, 4e6, stages="prune(0.3) -> nf4", params={"sparsity": 0.3}),
    ]


FRONT = [0, 4, 5, 9, 11, 12]
RECOMMENDATIONS = [
    {
        "name": "fastest within 1% perplexity",
        "where": {"perplexity_ratio": 1.01},
        "minimize": "latency_ratio",
    },
    {
        "name": "smallest within 5% perplexity",
        "where": {"perplexity_ratio": 1.05},
        "minimize": "weight_bytes",
    },
    {
        "name": "better than the baseline",
        "where": {"perplexity_ratio": 0.9},
        "minimize": "latency_ratio",
    },
]
CONSTRAINTS = [{"metric": "perplexity_ratio", "max": 1.05}]
IMPORTANCES = {
    "perplexity": {"sparsity": 0.7, "method": 0.3},
    "latency_ratio": {"sparsity": 0.2, "method": 0.8},
}
DEFINITIONS = {"perplexity": "exp of the mean token NLL on the test split"}
ENVIRONMENT = {"python": "3.11", "torch": "2.13.0"}
RECIPE = "name: sweep\nsearch:\n  trials: 30\n# <b>not bold</b>\n"


def write(tmp_path: Path, trials: list[dict], **kwargs) -> dict[str, Path]:
    args = {
        "name": "demo",
        "objectives": OBJECTIVES,
        "constraints": CONSTRAINTS,
        "recommendations": RECOMMENDATIONS,
        "importances": IMPORTANCES,
        "importance_note": "",
        "recipe_text": RECIPE,
        "meta": {"recipe": "sweep", "score": float("nan")},
        "definitions": DEFINITIONS,
        "environment": ENVIRONMENT,
    }
    args.update(kwargs)
    return write_sweep_report(tmp_path / "out", trials, **args)


# ---------------------------------------------------------------- pareto_front


def test_pareto_front_two_objectives_dominated_and_ties() -> None:
    points = [(1, 5), (2, 2), (3, 3), (5, 1), (2, 2), (1, 6), (4, 1)]
    # (3,3) is dominated by (2,2); (1,6) by (1,5), equal in one coordinate; (5,1) by (4,1).
    # The two (2,2) are equal: neither dominates the other, both are kept.
    assert pareto_front(points) == [0, 1, 4, 6]


def test_pareto_front_single_objective_keeps_all_minima() -> None:
    assert pareto_front([(3.0,), (1.0,), (2.0,), (1.0,)]) == [1, 3]
    assert pareto_front([[7.0]]) == [0]


def test_pareto_front_three_objectives() -> None:
    points = [(1, 2, 3), (2, 1, 3), (1, 2, 3), (2, 2, 3), (0, 5, 5), (3, 3, 2), (3, 3, 3)]
    # (2,2,3) is dominated by (1,2,3); (3,3,3) by (3,3,2); the others trade off.
    assert pareto_front(points) == [0, 1, 2, 4, 5]


def test_pareto_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(1, 1), (1, 1), (1, 1)]) == [0, 1, 2]
    with pytest.raises(ValueError, match="same length"):
        pareto_front([(1, 2), (1, 2, 3)])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1, math.nan), (1, 2)])


def test_pareto_trials_excludes_infeasible_failed_and_running() -> None:
    trials = hand_trials()
    assert pareto_trials(trials, OBJECTIVES) == FRONT
    # Single objective: only the lowest perplexity among the feasible complete trials.
    assert pareto_trials(trials, OBJECTIVES[:1]) == [0]
    # A non-finite objective value keeps a trial off the front.
    trials[9]["values"]["weight_bytes"] = math.inf
    trials[9]["weight_bytes"] = math.inf
    assert 9 not in pareto_trials(trials, OBJECTIVES)


# ---------------------------------------------------------------- recommendations


def test_recommend_picks_and_none() -> None:
    fastest, smallest, none = recommend(hand_trials(), RECOMMENDATIONS)
    # Within 1%: baseline (1.0) and trial 9 (1.005); infeasible trial 7 is faster but barred.
    assert fastest["trial"] == 9 and fastest["candidates"] == 2
    assert fastest["value"] == pytest.approx(0.55)
    # Smallest: trials 5, 11 and 12 all have 4e6 bytes; 12 has the lowest perplexity.
    assert smallest["trial"] == 12
    assert smallest["value"] == pytest.approx(4e6)
    assert smallest["perplexity"] == pytest.approx(40.6)
    # Only infeasible trial 7 has perplexity_ratio <= 0.9: nothing qualifies.
    assert none["trial"] is None and none["candidates"] == 0
    assert "no COMPLETE feasible trial" in none["note"]


def test_recommend_missing_where_metric_disqualifies() -> None:
    trials = hand_trials()
    trials[9]["perplexity_ratio"] = None
    (fastest,) = recommend(trials, RECOMMENDATIONS[:1])
    assert fastest["trial"] == 0  # 9 has no perplexity_ratio any more


def test_recommend_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"recommendations\[0\]\.minimize"):
        recommend(hand_trials(), [{"name": "x", "where": {}}])
    with pytest.raises(ValueError, match=r"recommendations\[0\]\.where\.perplexity_ratio"):
        recommend(hand_trials(), [{"where": {"perplexity_ratio": "low"}, "minimize": "x"}])


# ---------------------------------------------------------------- seed comparison


def test_seed_comparison_ratios_and_coverage() -> None:
    rows = {r["seed"]: r for r in seed_comparison(hand_trials(), OBJECTIVES)}
    assert list(rows) == ["baseline", "int8", "nf4", "prune50", "cpu-int8"]

    int8 = rows["int8"]
    assert not int8["on_front"]
    # Sampled dominators 5 and 6, best geometric mean first; 11 repeats 5's configuration
    # and is not counted again.
    assert [d["trial"] for d in int8["dominated_by"]] == [5, 6]
    best = int8["dominated_by"][0]
    assert best["ratios"]["perplexity"] == pytest.approx(40.8 / 41.0)
    assert best["ratios"]["latency_ratio"] == pytest.approx(0.5 / 0.8)
    assert best["ratios"]["weight_bytes"] == pytest.approx(0.8)
    expected = (40.8 / 41.0 * 0.625 * 0.8) ** (1 / 3)
    assert best["geomean_ratio"] == pytest.approx(expected)
    assert int8["dominated_by"][1]["ratios"]["weight_bytes"] == pytest.approx(0.9)
    assert int8["front_dominators"] == [5, 11]
    assert int8["covered_by_front"] is True

    assert rows["baseline"]["on_front"] and rows["baseline"]["dominated_by"] == []
    assert rows["cpu-int8"]["on_front"] and rows["cpu-int8"]["covered_by_front"] is True
    # Infeasible nf4 cannot be on the front; infeasible trial 7 does not count as beating it.
    assert rows["nf4"]["covered_by_front"] is None and rows["nf4"]["dominated_by"] == []
    assert rows["prune50"]["values"] is None and rows["prune50"]["covered_by_front"] is None


# ---------------------------------------------------------------- files


def test_csv_and_json(tmp_path: Path) -> None:
    trials = hand_trials()
    paths = write(tmp_path, trials)
    assert set(paths) == {"csv", "json", "html"} and all(p.is_file() for p in paths.values())

    df = pd.read_csv(paths["csv"])
    assert len(df) == len(trials)
    assert list(df["number"]) == [t["number"] for t in trials]
    for col in (
        "state",
        "seed",
        "feasible",
        "on_front",
        "stages",
        "error",
        "cached_from",
        "param.sparsity",
        "param.method",
        "value.perplexity",
        "value.latency_ratio",
        "value.weight_bytes",
        "perplexity",
        "latency_ratio",
        "weight_bytes",
    ):
        assert col in df.columns, col
    assert df.columns[0] == "number"
    assert sorted(df.loc[df["on_front"], "number"]) == FRONT
    assert df.loc[3, "error"].startswith("RuntimeError: out of memory")
    assert df.loc[5, "param.sparsity"] == pytest.approx(0.3)
    assert math.isnan(df.loc[0, "param.sparsity"])  # the baseline has no params
    assert df.loc[9, "param.method"] == EVIL
    assert df.loc[12, "value.perplexity"] == pytest.approx(40.6)
    assert json.loads(df.loc[5, "pipeline"])[0] == {"prune": {"sparsity": 0.5}}

    doc = json.loads(paths["json"].read_text())
    assert doc["meta"]["recipe"] == "sweep" and doc["meta"]["score"] is None
    assert doc["meta"]["sweep"]["front"] == FRONT
    assert doc["meta"]["sweep"]["front_configurations"] == [0, 4, 5, 9, 12]
    assert doc["meta"]["sweep"]["repeats"] == {"11": 5}
    assert doc["meta"]["sweep"]["front_covers_seeds"] is True
    assert [r["trial"] for r in doc["meta"]["sweep"]["recommendations"]] == [9, 12, None]
    assert len(doc["rows"]) == len(trials)
    assert [r["number"] for r in doc["rows"] if r["on_front"]] == FRONT


def test_html_content_and_escaping(tmp_path: Path) -> None:
    page = write(tmp_path, hand_trials())["html"].read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"<(script|link)\b", page)
    assert not re.search(r"https?://", page)
    assert not re.search(r"src=\"(?!data:)", page)
    front_section = page.split("Pareto front (all objectives)</h2>")[1].split("<h2")[0]
    for number in FRONT:
        assert f"#{number}<" in front_section
    for number in (1, 2, 3, 6, 7, 8, 10):
        assert f"#{number}<" not in front_section
    # trial 11 repeats trial 5's configuration: one row, which names it
    assert front_section.count("<tr") == 1 + 5  # header and one row per configuration
    assert ">#11<" in front_section.split(">#5<")[1].split("</tr>")[0]
    for rec in RECOMMENDATIONS:
        assert rec["name"] in page
    assert "no COMPLETE feasible trial meets perplexity_ratio ≤ 0.9" in page
    assert "RuntimeError: out of memory &lt;script&gt;" in page and "ValueError: x" in page
    assert "Front never worse than the seeds: <b>yes</b>" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "2.13.0" in page
    assert DEFINITIONS["perplexity"] in page
    # YAML variants ready to paste: trial 5 as a named entry with its pipeline.
    assert "- name: trial-5\n  pipeline:\n  - prune: {sparsity: 0.5}" in page
    assert "(repeated by #11)" in page and "name: trial-11" not in page
    # Two front plots and one importance chart.
    assert page.count(CHART) == 3


def test_html_without_plot_metrics_or_importances(tmp_path: Path) -> None:
    trials = hand_trials()
    for t in trials:
        for key in ("latency_ratio", "weight_bytes"):
            t[key] = None
            if t["values"]:
                t["values"][key] = None
    note = "importances need 2+ complete trials <per objective>"
    page = write(tmp_path, trials, importances={}, importance_note=note)["html"].read_text()
    assert CHART not in page
    assert "no plots" in page
    assert "importances need 2+ complete trials &lt;per objective&gt;" in page


def test_only_one_plot_when_weight_bytes_missing(tmp_path: Path) -> None:
    trials = hand_trials()
    for t in trials:
        t["weight_bytes"] = None
        if t["values"]:
            del t["values"]["weight_bytes"]
    page = write(tmp_path, trials, importances={})["html"].read_text()
    assert page.count(CHART) == 1
    assert 'aria-label="Perplexity vs latency"' in page


def test_hostile_names_in_plots_and_tables(tmp_path: Path) -> None:
    trials = hand_trials()
    trials[1]["seed"] = r"<b>$\notacommand{$</b>"  # HTML and matplotlib mathtext both
    label = r"ppl $\undefined$"
    paths = write(
        tmp_path,
        trials,
        objectives=[("perplexity", label), *OBJECTIVES[1:]],
        importances={"perplexity": {r"$\oops$": 1.0}},
    )
    page = paths["html"].read_text()
    assert page.count(CHART) == 3
    assert "<b>$" not in page and "&lt;b&gt;$" in page


def test_single_objective_and_empty_recommendations(tmp_path: Path) -> None:
    paths = write(tmp_path, hand_trials(), objectives=OBJECTIVES[:1], recommendations=[])
    assert json.loads(paths["json"].read_text())["meta"]["sweep"]["front"] == [0]
    assert "No recommendations were asked for." in paths["html"].read_text()


# ---------------------------------------------------------------- a realistic sweep


def realistic_sweep(n_sampled: int = 25, seed: int = 0) -> list[dict]:
    """About 30 trials: the baseline, four seeded variants and `n_sampled` sampled ones, with
    some failures, infeasible and cached trials."""
    rng = random.Random(seed)
    base_bytes = 17_203_200

    def record(
        number: int,
        seed_name: str | None,
        params: dict,
        stages: str,
        pipeline: list[dict],
        ppl: float,
        lat: float,
        wb_ratio: float,
    ) -> dict:
        ratio = ppl / BASE_PPL
        wb = int(base_bytes * wb_ratio)
        return {
            "number": number,
            "state": "COMPLETE",
            "seed": seed_name,
            "params": params,
            "stages": stages,
            "pipeline": pipeline,
            "values": {"perplexity": ppl, "latency_ratio": lat, "weight_bytes": wb},
            "feasible": ratio <= 1.05,
            "perplexity": ppl,
            "perplexity_ratio": ratio,
            "latency_ms": 12.0 * lat,
            "latency_baseline_ms": 12.0,
            "latency_ratio": lat,
            "weight_bytes": wb,
            "weight_bytes_ratio": wb / base_bytes,
            "param_count_ratio": None,
            "sparsity": params.get("prune.sparsity", 0.0),
            "bits_per_weight": 32 * wb_ratio,
            "saved_bytes": wb + 40_000,
            "peak_rss_bytes": 400_000_000 + wb,
            "model_rss_bytes": wb + 5_000_000,
            "error": None,
            "cached_from": None,
            "seconds": round(rng.uniform(20, 90), 1),
            "worker": f"worker-{number % 3}",
            "config_key": f"key-{number}",
        }

    trials = [
        record(0, "baseline", {}, "", [], BASE_PPL, 1.0, 1.0),
        record(
            1,
            "int8",
            {"quant": "int8"},
            "int8(threshold 6.0)",
            [{"int8": {"threshold": 6.0}}],
            40.3,
            1.9,
            0.31,
        ),
        record(
            2,
            "nf4",
            {"quant": "nf4"},
            "nf4(blocksize 64, double quant)",
            [{"nf4": {"blocksize": 64, "double_quant": True}}],
            41.9,
            2.4,
            0.17,
        ),
        record(
            3,
            "prune50",
            {"prune.sparsity": 0.5},
            "prune(sparsity 0.5)",
            [{"prune": {"sparsity": 0.5}}],
            44.8,
            0.98,
            1.0,
        ),
        record(
            4,
            "cpu-int8",
            {"quant": "dynamic-int8"},
            "dynamic-int8(lm_head)",
            [{"dynamic-int8": {"lm_head": True}}],
            40.2,
            0.62,
            0.55,
        ),
    ]
    for number in range(5, 5 + n_sampled):
        sparsity = rng.choice([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
        quant = rng.choice(["none", "int8", "nf4", "dynamic-int8"])
        distill = rng.choice([0, 100, 300]) if sparsity else 0
        params: dict = {"prune.sparsity": sparsity, "quant": quant}
        pipeline: list[dict] = []
        stages = []
        if sparsity:
            pipeline.append({"prune": {"sparsity": sparsity}})
            stages.append(f"prune(sparsity {sparsity})")
            params["distill.steps"] = distill
            if distill:
                pipeline.append(
                    {"distill": {"teacher": "baseline", "train": {"max_steps": distill}}}
                )
                stages.append(f"distill({distill} steps)")
        ppl = BASE_PPL * (1 + 0.5 * sparsity**2 / (1 + distill / 150)) + rng.gauss(0, 0.15)
        lat, wb = 1.0 - 0.1 * sparsity, 1.0
        if quant == "int8":
            pipeline.append({"int8": {"threshold": 6.0}})
            stages.append("int8(threshold 6.0)")
            ppl, lat, wb = ppl + 0.3, 1.9, 0.31
        elif quant == "nf4":
            pipeline.append({"nf4": {"blocksize": 64}})
            stages.append("nf4(blocksize 64)")
            ppl, lat, wb = ppl + 1.8, 2.4, 0.17
        elif quant == "dynamic-int8":
            pipeline.append({"dynamic-int8": {"lm_head": True}})
            stages.append("dynamic-int8(lm_head)")
            ppl, lat, wb = ppl + 0.2, 0.62 - 0.15 * sparsity, 0.55
        lat *= rng.uniform(0.97, 1.03)
        trials.append(
            record(
                number,
                None,
                params,
                " -> ".join(stages) or "(no stage)",
                pipeline,
                round(ppl, 3),
                round(lat, 3),
                wb,
            )
        )
    for number in (9, 17, 23):
        if number < len(trials):
            t = trials[number]
            for key in (
                "perplexity",
                "perplexity_ratio",
                "latency_ms",
                "latency_ratio",
                "weight_bytes",
                "weight_bytes_ratio",
                "values",
            ):
                t[key] = None
            t.update(state="FAIL", feasible=False)
            t["error"] = (
                "bitsandbytes: CUDA required for nf4 on this build"
                if number == 9
                else "RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x192 and 256x768)"
            )
    if len(trials) > 20:
        trials[20] = {**trials[12], "number": 20, "cached_from": "trial 12", "seconds": 0.2}
    running = record(len(trials), None, {"quant": "nf4"}, "nf4(blocksize 64)", [], 0, 1, 1)
    running.update(dict.fromkeys(METRIC_KEYS), state="RUNNING", values=None, seconds=None)
    trials.append(running)
    return trials


def test_realistic_sweep_report(tmp_path: Path) -> None:
    trials = realistic_sweep()
    paths = write(
        tmp_path,
        trials,
        importances={
            "perplexity": {"prune.sparsity": 0.62, "quant": 0.3, "distill.steps": 0.08},
            "latency_ratio": {"quant": 0.91, "prune.sparsity": 0.09},
        },
    )
    df = pd.read_csv(paths["csv"])
    assert len(df) == len(trials) == 31
    assert (df["state"] == "FAIL").sum() == 3
    front = json.loads(paths["json"].read_text())["meta"]["sweep"]["front"]
    assert front and all(trials[n]["state"] == "COMPLETE" and trials[n]["feasible"] for n in front)
    # exactly the non-dominated COMPLETE feasible trials, by brute force over all pairs
    keys = [k for k, _ in OBJECTIVES]
    ok = [t for t in trials if t["state"] == "COMPLETE" and t["feasible"]]

    def vec(t: dict) -> list[float]:
        return [t["values"][k] for k in keys]

    def beaten(t: dict) -> bool:
        return any(all(a <= b for a, b in zip(vec(u), vec(t))) and vec(u) != vec(t) for u in ok)

    assert front == [t["number"] for t in ok if not beaten(t)]
    # trial 20 repeats trial 12's configuration (a reused result)
    sweep = json.loads(paths["json"].read_text())["meta"]["sweep"]
    assert sweep["repeats"] == {"20": 12}
    assert 20 not in sweep["front_configurations"]
    page = paths["html"].read_text()
    assert page.count(CHART) == 3
    assert "mat1 and mat2 shapes cannot be multiplied" in page


# ---------------------------------------------------------------- readable YAML and labels


def test_paste_ready_yaml_has_rounded_values() -> None:
    import yaml

    from compress.report.sweep import analyse, front_variants_yaml

    t = trial(1, 40.1, 0.5, 100.0, seed="p15", stages="prune(sparsity=0.15)")
    t["pipeline"] = [{"prune": {"sparsity": 0.1 + 0.05, "method": "wanda"}}, {"int8": {}}]
    assert t["pipeline"][0]["prune"]["sparsity"] == 0.15000000000000002  # what a step makes
    trials = [trial(0, BASE_PPL, 1.0, 200.0, seed="baseline"), t]
    text = front_variants_yaml(trials, analyse(trials, OBJECTIVES, []))
    assert "0.15000000000000002" not in text
    entries = yaml.safe_load(text)
    pipeline = [{"prune": {"sparsity": 0.15, "method": "wanda"}}, {"int8": {}}]
    assert entries == [{"name": "p15", "pipeline": pipeline}]


def _boxes(anchors, texts, offsets, char_w=5.5, line_h=11.0):
    out = []
    for (x, y), text, (dx, dy) in zip(anchors, texts, offsets, strict=True):
        w = char_w * len(text)
        left = x + dx if dx >= 0 else x + dx - w
        out.append((left, y + dy, left + w, y + dy + line_h))
    return out


def test_labels_of_nearby_points_do_not_overprint() -> None:
    from compress.report.sweep import place_labels

    anchors = [(100.0, 100.0), (102.0, 101.0), (104.0, 99.0), (300.0, 300.0)]
    texts = ["dynamic-int8", "int8", "prune50-int8", "far"]
    offsets = place_labels(anchors, texts)
    boxes = _boxes(anchors, texts, offsets)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            assert apart, (texts[i], texts[j], a, b)
    assert offsets[3] == (6, 4)  # a lone point keeps the usual place
    # what the old fixed offset did: every label at (6, 4), the first three overprinting
    same = _boxes(anchors[:3], texts[:3], [(6, 4)] * 3)
    assert not (same[0][2] <= same[1][0] or same[1][2] <= same[0][0])


def test_seeds_at_the_same_point_share_one_label(monkeypatch) -> None:
    from compress.report.sweep import plots as sweep_plots

    seen: list[str] = []
    real = sweep_plots.place_labels

    def spy(anchors, texts, *args, **kwargs):
        seen.extend(texts)
        return real(anchors, texts, *args, **kwargs)

    monkeypatch.setattr(sweep_plots, "place_labels", spy)  # where front_plot looks it up
    trials = [
        trial(0, BASE_PPL, 1.0, 200.0, seed="baseline"),
        trial(1, 40.2, 0.5, 100.0, seed="int8", stages="int8"),
        trial(2, 40.2, 0.5, 100.0, seed="int8-again", stages="int8"),
    ]
    assert sweep_plots.front_plot(
        trials, "latency_ratio", "perplexity", title="t", x_label="x", y_label="y"
    )
    assert sorted(seen) == ["baseline", "int8, int8-again"]
