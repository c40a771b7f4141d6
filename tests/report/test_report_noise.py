"""The HTML summary shows intervals and marks noisy and within-noise numbers."""

from __future__ import annotations

import re

from compress.report import render_html
from tests.test_run_noise import ROWS


def _page(rows: list[dict]) -> str:
    return render_html(rows, title="t", recipe_text="", definitions={}, environment={})


def test_summary_marks_noise() -> None:
    rows = [dict(r) for r in ROWS]
    rows[1].update(perplexity_lo=128.0, perplexity_hi=130.9)
    page = _page(rows)
    text = re.sub(r"<(?!/td)[^>]+>", "", page)  # the cells' text, cell ends kept
    assert "129.40 [128.00, 130.90]" in text
    assert "1.550 [0.900, 2.400] NOISY" in text
    assert "0.520 [0.510, 0.530]</td>" in text
    assert '<span class="ci"> [0.510, 0.530]</span>' in page  # the interval on its own line
    assert page.count("(within noise)") == 1
    assert "Partial baseline" not in page


def test_partial_baseline_notice_comes_first() -> None:
    rows = [{**r, "baseline_partial": "partial: 115 of 700 steps"} for r in ROWS]
    page = _page(rows)
    assert page.index('<h2 id="sec-partial-baseline">') < page.index('<h2 id="sec-summary">')
    assert "The baseline is partial: 115 of 700 steps" in page
