"""Tests for compress.report: ratios, CSV/JSON, HTML, the Optuna study and the dashboard."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from compress.report import (
    RATIO_METRICS,
    add_ratios,
    dashboard_command,
    html_table,
    ratio_bar_charts,
    render_html,
    write_csv,
    write_json,
    write_report,
    write_study,
)

EVIL = "<script>x</script>"


def fake_rows() -> list[dict]:
    baseline = {
        "variant": "baseline",
        "status": "ok",
        "error": None,
        "stages": "",
        "param_count": 4_200_000,
        "weight_bytes": 16_800_000,
        "quantized_layer_bytes": 0,
        "quantized_layer_fp32_bytes": 0,
        "saved_bytes": 16_900_000,
        "peak_rss_bytes": 450_000_000,
        "model_rss_bytes": 40_000_000,
        "gpu_peak_bytes": 30_000_000,
        "sparsity": 0.0,
        "perplexity": 41.3,
        "eval_tokens": 65536,
        "latency_ms": 12.0,
        "latency_iqr_ms": 0.4,
        "seed": 1,  # an extra key: must survive into CSV, JSON and the study
    }
    int8 = dict(
        baseline,
        variant="int8",
        stages="int8(threshold=6.0)",
        weight_bytes=4_200_000,  # 4x smaller
        quantized_layer_bytes=3_000_000,
        quantized_layer_fp32_bytes=12_000_000,
        saved_bytes=4_300_000,
        peak_rss_bytes=300_000_000,
        model_rss_bytes=10_000_000,
        gpu_peak_bytes=12_000_000,
        perplexity=41.7,
        latency_ms=6.0,
        latency_iqr_ms=0.3,
        latency_ratio=0.48,  # measured paired: not 6.0 / 12.0
    )
    failed = {
        "variant": EVIL,
        "status": "failed",
        "error": "RuntimeError: boom & <bad>",
        "stages": "prune(sparsity=0.5)",
        "param_count": None,
        "weight_bytes": None,
        "quantized_layer_bytes": None,
        "quantized_layer_fp32_bytes": None,
        "saved_bytes": None,
        "peak_rss_bytes": None,
        "model_rss_bytes": None,
        "gpu_peak_bytes": None,
        "sparsity": None,
        "perplexity": float("nan"),
        "eval_tokens": None,
        "latency_ms": None,
        "latency_iqr_ms": None,
        "seed": 1,
    }
    return [baseline, int8, failed]


META = {"recipe": "int8", "seed": 1, "score": float("nan"), "path": Path("reports/int8")}
DEFINITIONS = {
    "perplexity": "exp of the token-weighted mean NLL over the held-out split",
    "latency": "median forward wall time after warm-up, batch 8 x 256, 2 threads",
}
ENVIRONMENT = {"python": "3.11", "torch": "2.13.0", "machine": "x86_64, 2 cores"}
RECIPE = "name: int8\npipeline:\n  - quantize: {method: int8, threshold: 6.0}\n"


# ---------------------------------------------------------------- ratios


def test_add_ratios_values_and_none() -> None:
    rows = fake_rows()
    out = add_ratios(rows)
    base, int8, failed = out
    for metric in RATIO_METRICS:
        assert base[f"{metric}_ratio"] == pytest.approx(1.0)
    assert int8["weight_bytes_ratio"] == pytest.approx(0.25)
    # measured paired (variant and baseline in alternating rounds): kept, never recomputed
    assert int8["latency_ratio"] == 0.48
    assert "latency_ratio" not in base
    assert int8["perplexity_ratio"] == pytest.approx(41.7 / 41.3)
    assert int8["param_count_ratio"] == pytest.approx(1.0)
    assert int8["quantized_layer_bytes_ratio"] == pytest.approx(0.25)
    assert base["quantized_layer_bytes_ratio"] is None  # fp32 bytes 0: no quantized layers
    for metric in RATIO_METRICS:
        assert failed[f"{metric}_ratio"] is None  # None, and NaN perplexity, give None
    assert failed["quantized_layer_bytes_ratio"] is None
    # New dicts; the input rows are untouched.
    assert "weight_bytes_ratio" not in rows[1]
    assert out[1] is not rows[1]


def test_add_ratios_zero_baseline_gives_none() -> None:
    rows = [{"variant": "b", "param_count": 0}, {"variant": "v", "param_count": 5}]
    assert add_ratios(rows)[1]["param_count_ratio"] is None


# ---------------------------------------------------------------- CSV / JSON


def test_csv_round_trip(tmp_path: Path) -> None:
    rows = add_ratios(fake_rows())
    path = write_csv(tmp_path / "results.csv", rows)
    df = pd.read_csv(path)
    assert list(df["variant"]) == ["baseline", "int8", EVIL]
    cols = list(df.columns)
    assert cols[:4] == ["variant", "status", "perplexity", "perplexity_ratio"]
    assert cols[-1] == "error"
    for metric in RATIO_METRICS:
        assert cols.index(f"{metric}_ratio") == cols.index(metric) + 1
    assert "quantized_layer_bytes_ratio" in cols
    assert "seed" in cols  # extra keys are kept
    assert df.loc[1, "weight_bytes_ratio"] == pytest.approx(0.25)
    assert df.loc[1, "quantized_layer_bytes_ratio"] == pytest.approx(0.25)
    assert df.loc[0, "weight_bytes"] == 16_800_000
    assert math.isnan(df.loc[2, "weight_bytes_ratio"])
    assert df.loc[2, "error"] == "RuntimeError: boom & <bad>"
    # Integers are written as integers, not 16800000.0.
    assert ",16800000," in path.read_text()


def test_json_round_trip(tmp_path: Path) -> None:
    rows = add_ratios(fake_rows())
    path = write_json(tmp_path / "results.json", rows, META)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert doc["meta"]["recipe"] == "int8"
    assert doc["meta"]["score"] is None
    assert doc["meta"]["path"] == str(Path("reports/int8"))
    assert [r["variant"] for r in doc["rows"]] == ["baseline", "int8", EVIL]
    assert doc["rows"][2]["perplexity"] is None  # NaN -> null
    assert doc["rows"][1]["weight_bytes_ratio"] == pytest.approx(0.25)
    assert doc["rows"][1]["seed"] == 1


# ---------------------------------------------------------------- charts / HTML


def test_charts_are_svgs_and_skip_failed_rows() -> None:
    charts = ratio_bar_charts(fake_rows())
    titles = [t for t, _ in charts]
    assert len(charts) == 3
    assert any("Perplexity" in t for t in titles)
    assert any("latency" in t for t in titles)
    assert any("Memory" in t for t in titles)
    for _, svg in charts:
        assert b"<svg" in svg[:1000] and svg.rstrip().endswith(b"</svg>")
        assert b"\x89PNG" not in svg
    # Nothing measured at all: no charts, no crash.
    assert ratio_bar_charts([fake_rows()[2]]) == []


def test_charts_do_not_touch_pyplot_backend() -> None:
    import matplotlib

    before = matplotlib.get_backend()
    ratio_bar_charts(fake_rows())
    assert matplotlib.get_backend() == before


def _render(rows: list[dict]) -> str:
    rows = add_ratios(rows)
    return render_html(
        rows,
        title="compress report: int8",
        recipe_text=RECIPE + "# <b>not bold</b>\n",
        definitions=DEFINITIONS,
        environment=ENVIRONMENT,
        sections=[("Baseline training", "<p id='frag'>trained 200 steps</p>")],
        charts=ratio_bar_charts(rows),
    )


def test_html_content_and_escaping() -> None:
    page = _render(fake_rows())
    for name in ("baseline", "int8"):
        assert name in page
    assert EVIL not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert "RuntimeError: boom &amp; &lt;bad&gt;" in page  # failed row shows its error
    assert page.count("<svg") == 3 and "data:image/png;base64," not in page
    for term, text in DEFINITIONS.items():
        assert term in page and text in page
    assert "quantize: {method: int8, threshold: 6.0}" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page  # recipe text is escaped
    assert "<p id='frag'>trained 200 steps</p>" in page  # sections are inserted as given
    assert "2.13.0" in page
    assert "0.250" in page  # weight ratio of int8
    # Self-contained: no external resources of any kind.
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|script)\b", page)
    assert not re.search(r"src=\"(?!data:)", page)


def test_html_table_escapes_cells() -> None:
    out = html_table([{"a": EVIL, "b": 1234567}, {"a": "ok", "c": 0.5}])
    assert EVIL not in out and "&lt;script&gt;" in out
    assert "1,234,567" in out and "0.5" in out
    assert out.count("</th>") == 3 and out.count('<th class="text">a<') == 1
    assert html_table([{"a": 1, "b": 2}], columns=["b"]).count("<td") == 1


# ---------------------------------------------------------------- Optuna study


def _check_study(storage: str, name: str, rows: list[dict]) -> optuna.Study:
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.metric_names == ["perplexity", "latency_ms", "weight_bytes"]
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == len(rows)
    for trial, row in zip(trials, rows, strict=True):
        assert trial.params == {"variant": row["variant"]}
    base, int8, failed = trials
    assert base.state == TrialState.COMPLETE and int8.state == TrialState.COMPLETE
    assert base.values == pytest.approx([41.3, 12.0, 16_800_000])
    assert int8.values == pytest.approx([41.7, 6.0, 4_200_000])
    assert int8.user_attrs["stages"] == "int8(threshold=6.0)"
    assert int8.user_attrs["weight_bytes_ratio"] == pytest.approx(0.25)
    assert int8.user_attrs["seed"] == 1
    assert failed.state == TrialState.FAIL
    assert failed.values is None
    assert failed.user_attrs["error"] == "RuntimeError: boom & <bad>"
    assert failed.user_attrs["perplexity"] is None
    return study


def test_write_study_round_trip_and_replace(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    rows = add_ratios(fake_rows())
    write_study(storage, "int8", rows, meta={"recipe": "int8", "score": float("nan")})
    study = _check_study(storage, "int8", rows)
    assert study.user_attrs == {"recipe": "int8", "score": None}
    assert set(study.directions) == {optuna.study.StudyDirection.MINIMIZE}
    assert len(study.best_trials) == 2  # int8 is faster/smaller, baseline has lower ppl

    write_study(storage, "int8", rows)  # again: replaced, not duplicated
    _check_study(storage, "int8", rows)
    summaries = optuna.get_all_study_summaries(storage)
    assert [s.study_name for s in summaries] == ["int8"]


def test_ok_row_with_missing_objective_is_fail(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    rows = fake_rows()[:2]
    rows[1] = dict(rows[1], latency_ms=None)
    write_study(storage, "s", rows)
    trial = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert trial.state == TrialState.FAIL
    assert "latency_ms" in trial.user_attrs["error"]


def test_dashboard_command() -> None:
    expected = "python -m compress.dashboard reports/x"
    assert dashboard_command(Path("reports/x/study.db")) == expected  # what write_report passes
    assert dashboard_command("reports/x") == expected
    assert dashboard_command(Path("/tmp/r/sweep.json")) == "python -m compress.dashboard /tmp/r"
    assert dashboard_command("/tmp/my run") == "python -m compress.dashboard '/tmp/my run'"


# ---------------------------------------------------------------- write_report


def test_write_report_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "int8"
    paths = write_report(
        out,
        fake_rows(),
        name="int8",
        recipe_text=RECIPE,
        meta=META,
        definitions=DEFINITIONS,
        environment=ENVIRONMENT,
        sections=[("Unigram vs model", html_table([{"model": "unigram", "ppl": 900.0}]))],
    )
    assert paths == {
        "csv": out / "results.csv",
        "json": out / "results.json",
        "html": out / "report.html",
        "study": out / "study.db",
    }
    assert all(p.is_file() for p in paths.values())
    assert pd.read_csv(paths["csv"]).loc[1, "weight_bytes_ratio"] == pytest.approx(0.25)
    assert json.loads(paths["json"].read_text())["meta"]["recipe"] == "int8"
    page = paths["html"].read_text()
    assert "Unigram vs model" in page and "<svg" in page
    _check_study(f"sqlite:///{paths['study']}", "int8", fake_rows())


# ---------------------------------------------------------------- optuna-dashboard


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_optuna_dashboard_serves_the_study(tmp_path: Path) -> None:
    pytest.importorskip("optuna_dashboard")
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    write_study(storage, "dash-study", add_ratios(fake_rows()))
    try:
        port = _free_loopback_port()
    except OSError as exc:
        pytest.skip(f"cannot bind a loopback port: {exc}")
    code = (
        "import sys, optuna_dashboard; "
        "optuna_dashboard.run_server(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, storage, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Loopback only, and never through a proxy set in the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{port}/api/studies"
    body = None
    try:
        deadline = time.monotonic() + 120  # a loaded machine starts the server slowly
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                if "address already in use" in err.lower() or "errno 98" in err.lower():
                    pytest.skip(f"optuna-dashboard could not bind port {port}")
                pytest.fail(f"optuna-dashboard exited with {proc.returncode}: {err[-2000:]}")
            try:
                with opener.open(url, timeout=2) as resp:
                    body = resp.read().decode()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert body is not None, "optuna-dashboard did not answer within 120 s"
    names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
    assert names == ["dash-study"]
