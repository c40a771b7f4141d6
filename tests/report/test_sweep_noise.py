"""A sweep never puts a trial with a noisy latency on a latency front or recommends it by
latency: it is left out and labelled until measured again."""

from __future__ import annotations

from compress.report import pareto_trials, recommend, write_sweep_report
from tests.report.test_sweep_report import OBJECTIVES, trial


def _trials() -> list[dict]:
    base = trial(0, 40.0, 1.0, 1000, seed="baseline")
    base["latency_noisy"] = False
    honest = trial(1, 40.2, 0.55, 500, stages="int8")
    honest.update(latency_noisy=False, latency_ratio_lo=0.53, latency_ratio_hi=0.57)
    # "faster" only by noise: unstructured sparsity cannot speed up a dense matmul
    lucky = trial(2, 40.1, 0.40, 600, stages="prune(sparsity=0.15) -> distill")
    lucky.update(latency_noisy=True, latency_ratio_lo=0.2, latency_ratio_hi=1.4)
    return [base, honest, lucky]


def test_noisy_latency_trial_is_off_the_latency_front() -> None:
    trials = _trials()
    assert pareto_trials(trials, OBJECTIVES) == [0, 1]
    # judged without latency, its other numbers still count
    assert pareto_trials(trials, [("perplexity", "p"), ("weight_bytes", "w")]) == [0, 1, 2]
    trials[2]["latency_noisy"] = False
    assert pareto_trials(trials, OBJECTIVES) == [0, 1, 2]


def test_noisy_latency_trial_is_never_recommended_by_latency() -> None:
    fastest = {"name": "fastest", "where": {"perplexity_ratio": 1.01}, "minimize": "latency_ratio"}
    smallest = {"name": "smallest", "where": {"latency_ratio": 0.9}, "minimize": "weight_bytes"}
    ppl_only = {"name": "best ppl", "minimize": "perplexity"}
    trials = _trials()
    for t in trials:
        t["perplexity_ratio"] = t["values"]["perplexity"] / 40.0
    picks = recommend(trials, [fastest, smallest, ppl_only])
    assert picks[0]["trial"] == 1 and picks[0]["noisy_excluded"] == 1
    assert "1 trial(s) with a noisy latency left out" in picks[0]["note"]
    assert picks[1]["trial"] == 1 and picks[1]["noisy_excluded"] == 1
    assert picks[2]["trial"] == 0 and picks[2]["noisy_excluded"] == 0


def test_report_labels_the_noisy_trial(tmp_path) -> None:
    rec = [{"name": "fastest", "minimize": "latency_ratio"}]
    paths = write_sweep_report(
        tmp_path,
        _trials(),
        name="noise",
        objectives=OBJECTIVES,
        constraints=[],
        recommendations=rec,
        importances={},
        recipe_text="",
        meta={},
        definitions={},
        environment={},
    )
    page = paths["html"].read_text()
    assert "noisy latency" in page and "left out: noisy latency" in page
