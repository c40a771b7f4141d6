"""What the dashboard shows of a run: readable attributes, a note, each trial's own page."""

from __future__ import annotations

from pathlib import Path

import optuna

from compress.report.study import readable, run_note, trial_report_html, write_study

ROWS = [
    {
        "variant": "baseline",
        "status": "ok",
        "perplexity": 129.30000000000001,
        "latency_ms": 10.0,
        "weight_bytes": 1000,
        "weight_bytes_ratio": 1.0,
        "latency_ratio": 1.0,
    },
    {
        "variant": "int8",
        "status": "ok",
        "perplexity": 129.4,
        "latency_ms": 5.1,
        "weight_bytes": 300,
        "weight_bytes_ratio": 0.30000000000000004,
        "ppl_delta": 0.1,
        "ppl_delta_lo": -0.05,
        "ppl_delta_hi": 0.25,
        "ppl_within_noise": True,
        "latency_ratio": 0.51,
        "latency_noisy": False,
        "stages": "int8",
    },
    {
        "variant": "nf4",
        "status": "ok",
        "perplexity": 131.0,
        "latency_ms": 20.0,
        "weight_bytes": 200,
        "weight_bytes_ratio": 0.2,
        "ppl_delta": 1.7,
        "ppl_delta_lo": 1.2,
        "ppl_delta_hi": 2.2,
        "ppl_within_noise": False,
        "latency_ratio": 2.0,
        "latency_noisy": True,
    },
    {"variant": "broken", "status": "failed", "error": "ValueError: no module matches"},
]


def test_readable_rounds_floats_and_flattens_structures() -> None:
    assert readable(0.15000000000000002) == 0.15
    assert readable(129.34567891234) == 129.346
    assert readable(12_345_678) == 12_345_678  # ints (bytes, counts) exact
    assert readable(float("nan")) is None
    assert readable((1, 2)) == "1, 2"
    assert readable({"sparsity": 0.15000000000000002, "method": "wanda"}) == (
        "sparsity=0.15, method=wanda"
    )
    assert (
        readable([{"prune": {"sparsity": 0.5}}, {"int8": {}}])
        == "(prune=(sparsity=0.5)), (int8=())"
    )
    assert readable("text") == "text" and readable(True) is True and readable(None) is None


def test_run_note_summarises_and_recommends() -> None:
    note = run_note(ROWS)
    assert "| int8 | 129.400 | +0.100 [-0.050, +0.250] within noise | 0.510 | 0.300 | ok |" in note
    assert "(noisy)" in note.split("| nf4 |")[1].splitlines()[0]
    assert "FAILED: ValueError: no module matches" in note
    assert (
        "Smallest variant whose perplexity the data cannot tell from the baseline's: **int8**"
        in note
    )
    assert "Fastest variant with a trustworthy latency ratio: **int8** (0.510x, faster" in note
    assert "too noisy to rank: nf4" in note
    assert "Failed: broken" in note


def test_study_of_a_run_has_a_note_rounded_attrs_and_metric_names(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    meta = {
        "recipe": "r",
        "corpus": {"description": "d", "fingerprint": "f"},
        "training": {"x": [1]},
    }
    write_study(storage, "r", ROWS, meta=meta)
    study = optuna.load_study(study_name="r", storage=storage)
    assert study.metric_names == ["perplexity", "latency_ms", "weight_bytes"]
    base, int8 = study.trials[:2]
    assert base.user_attrs["perplexity"] == 129.3
    assert int8.user_attrs["weight_bytes_ratio"] == 0.3
    assert base.values[0] == 129.30000000000001  # the objective itself is not rounded
    assert study.user_attrs == {"recipe": "r", "corpus": "description=d, fingerprint=f"}
    from optuna_dashboard._note import get_note_from_system_attrs

    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert get_note_from_system_attrs(attrs, None)["body"] == run_note(ROWS)


def test_trial_page_shows_labels_rounded_numbers_and_stages() -> None:
    page = trial_report_html(
        "Trial 4",
        "prune(sparsity=0.15) -> int8",
        {"sparsity": 0.15000000000000002},
        {"perplexity": 129.34567891, "weight_bytes": 123456, "latency_noisy": True},
        {
            "stage_reports": [
                {
                    "stage": "prune",
                    "config": {"sparsity": 0.15},
                    "touched": [{"module": "a"}],
                    "skipped": [{"module": "lm_head", "reason": "tied <embedding>"}],
                    "seconds": 1.25,
                }
            ],
            "latency": {"variant": {"median_ms": 1.23456, "samples_ms": list(range(40))}},
        },
    )
    assert page.startswith("<!doctype html>") and "<title>Trial 4</title>" in page
    assert "prune(sparsity=0.15) -&gt; int8" in page
    assert "0.15000000000000002" not in page and "<td>0.15</td>" in page
    assert "<th>perplexity</th><td>129.3</td>" in page
    assert "<td>123,456</td>" in page
    assert "tied &lt;embedding&gt;" in page
    assert "<td>40 values</td>" in page and "<td>1.235</td>" in page
