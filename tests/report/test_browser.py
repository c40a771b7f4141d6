"""The report page in a real browser: headless Chromium loads it, and any console error or
JavaScript exception fails the test. Skipped, with the reason, where Chromium or playwright is
not installed (no browser is ever downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from compress.report import write_report
from tests.report.test_report import DEFINITIONS, ENVIRONMENT, RECIPE, fake_rows

CHROMIUM = os.environ.get("COMPRESS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (install it, or set COMPRESS_CHROMIUM)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def load(browser, path: Path, width: int = 1280):
    """Open ``path``; returns the page and the console errors and page exceptions it raised."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_timeout(200)  # late errors
    return page, problems


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report"
    rows = fake_rows()
    rows[0].update(perplexity_lo=40.9, perplexity_hi=41.7, latency_ratio=1.0)
    rows[1].update(latency_ratio_lo=0.45, latency_ratio_hi=0.52, latency_noisy=True)
    layers = [
        {"module": f"blocks.{i}.mlp.fc_in", "weights": 100, "zeros": 0, "sparsity": 0.0}
        | {"weight_bytes": 400, "bits_per_weight": 32.0}
        for i in range(3)
    ]
    meta = {"recipe": "int8", "variants": {"baseline": {"layers": layers}, "int8": {}}}
    (out / "variants" / "int8").mkdir(parents=True)
    write_report(
        out,
        rows,
        name="int8",
        recipe_text=RECIPE,
        meta=meta,
        definitions=DEFINITIONS,
        environment=ENVIRONMENT,
    )
    return out / "report.html"


def test_report_has_no_console_errors(browser, report: Path) -> None:
    page, problems = load(browser, report)
    assert problems == []
    page.close()


def test_an_injected_error_is_caught(browser, report: Path, tmp_path: Path) -> None:
    """The check above can fail: a console error, and separately an exception, are seen."""
    for script, expected in (
        ("console.error('broken chart')", "console error: broken chart"),
        ("throw new Error('kaput')", "exception: "),
    ):
        bad = tmp_path / "bad.html"
        bad.write_text(report.read_text().replace("</body>", f"<script>{script}</script></body>"))
        page, problems = load(browser, bad)
        assert any(p.startswith(expected) for p in problems), problems
        page.close()


def test_page_layout_in_the_browser(browser, report: Path) -> None:
    page, _ = load(browser, report, width=1000)
    found = page.evaluate(
        """() => {
        const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
        const toc = [...document.querySelectorAll('nav.toc a')].map(a => a.hash.slice(1));
        const svgs = [...document.querySelectorAll('figure svg')];
        const table = document.querySelector('table.summary');
        const box = table.parentElement;
        return {
          duplicateIds: ids.filter((id, i) => ids.indexOf(id) !== i),
          tocMissing: toc.filter(id => !document.getElementById(id)),
          tocCount: toc.length,
          svgWidths: svgs.map(s => s.getBoundingClientRect().width),
          pageOverflow: document.documentElement.scrollWidth - window.innerWidth,
          tableScrolls: getComputedStyle(box).overflowX,
          boxRight: box.getBoundingClientRect().right,
        };
    }"""
    )
    assert found["duplicateIds"] == []  # several inline SVGs never share an id
    assert found["tocCount"] >= 6 and found["tocMissing"] == []
    assert len(found["svgWidths"]) >= 5 and min(found["svgWidths"]) > 300
    # the page never scrolls sideways: a wide summary scrolls inside its own box
    assert found["pageOverflow"] <= 0
    assert found["tableScrolls"] == "auto" and found["boxRight"] <= 1000
    page.close()


def test_scan_page_has_no_console_errors_and_draws_its_heat_map(browser, tmp_path: Path) -> None:
    from compress.scan.measure import ScanResult
    from compress.scan.report import write_scan

    layers = [f"blocks.{i}.mlp.fc_in" for i in range(3)]
    settings = ["prune magnitude 0.5", "prune magnitude 0.7"]
    rows = [
        {
            "layer": n,
            "block": i,
            "numel": 100,
            "setting": s,
            "kind": "prune",
            "method": "magnitude",
            "value": v,
            "simulated": False,
            "perplexity": 30 + i + v,
            "delta": i + v,
            "delta_lo": i + v - 0.6,
            "delta_hi": i + v + 0.6,
            "ratio": (30 + i + v) / 30,
        }
        for i, n in enumerate(layers)
        for s, v in zip(settings, (0.5, 0.7))
    ]
    result = ScanResult(
        30.0,
        4096,
        "valid",
        128,
        layers,
        {n: 100 for n in layers},
        {n: i for i, n in enumerate(layers)},
        settings,
        rows,
    )
    paths = write_scan(tmp_path, result, "s", {"model": "m"})
    page, problems = load(browser, paths["html"])
    assert problems == []
    cells = page.evaluate("() => document.querySelectorAll('svg rect').length")
    assert cells >= len(rows)
    assert "~" in page.inner_text("table")  # block 0 at 0.5: its interval reaches 0
    page.close()
