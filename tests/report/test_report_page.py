"""What the plain-run report page holds: SVG charts, a table of contents whose links resolve,
provenance, rounded numbers, stages as text, links to saved models, the recipe as written."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compress.report import write_report
from compress.report.html import format_value, render_html
from compress.report.plots import (
    inline_svg,
    latency_chart,
    layer_charts,
    place_labels,
    scatter_charts,
)
from compress.report.provenance import provenance
from compress.report.tables import add_ratios
from tests.report.test_report import DEFINITIONS, ENVIRONMENT, fake_rows

RECIPE_AS_WRITTEN = (
    "# my comment stays\nname: int8\nvariants:\n  - {name: int8, pipeline: [int8]}\n"
)


def rows() -> list[dict]:
    base, int8, failed = fake_rows()
    base = {**base, "perplexity": 41.300000000000004, "perplexity_lo": 40.9, "perplexity_hi": 41.7}
    int8 = {
        **int8,
        "stages": "prune 50% magnitude -> distill 60 steps -> int8",
        "latency_ratio_lo": 0.45,
        "latency_ratio_hi": 0.52,
        "sparsity": 0.15000000000000002,
    }
    slow = {**int8, "variant": "slow", "latency_ratio": 35.0, "latency_noisy": True}
    return [base, int8, slow, failed]


def layers(bits: float, sparsity: float) -> list[dict]:
    return [
        {"module": f"blocks.{i}.{m}", "weights": 100, "zeros": int(100 * sparsity)}
        | {"sparsity": sparsity, "weight_bytes": int(100 * bits / 8), "bits_per_weight": bits}
        for i in range(2)
        for m in ("attn.q_proj", "mlp.fc_out")
    ]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("page") / "int8"
    (out / "variants" / "int8").mkdir(parents=True)
    meta = {
        "recipe": "int8",
        "variants": {
            "baseline": {"layers": layers(32.0, 0.0)},
            "int8": {"layers": layers(8.5, 0.5)},
        },
    }
    paths = write_report(
        out,
        rows(),
        name="int8",
        recipe_text=RECIPE_AS_WRITTEN,
        meta=meta,
        definitions=DEFINITIONS,
        environment=ENVIRONMENT,
        provenance_info={**provenance(), "host": "testhost"},
    )
    return paths["html"].read_text(), out


def test_charts_are_inline_svg(page) -> None:
    html, _ = page
    svgs = re.findall(r"<svg\b.*?</svg>", html, flags=re.S)
    # perplexity, latency, memory, two scatters, sparsity and bits per layer
    assert len(svgs) == 7
    assert "data:image/png" not in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # no two charts share an id
    for ref in re.findall(r'(?:href="#|url\(#)([^")]+)', html):
        assert ref in ids, ref  # every reference (TOC links, clip paths) resolves
    assert "Sparsity per layer" in html and "Bits per weight per layer" in html
    assert "Perplexity vs latency" in html and "Perplexity vs weight size" in html


def test_table_of_contents_lists_every_section(page) -> None:
    html, _ = page
    toc = re.search(r'<nav class="toc".*?</nav>', html, flags=re.S).group(0)
    links = re.findall(r'href="#([^"]+)"', toc)
    headings = re.findall(r'<h2 id="([^"]+)">', html)
    assert links == headings
    for name in ("summary", "charts", "recipe", "provenance", "environment"):
        assert f"sec-{name}" in links


def test_provenance_recipe_and_model_links(page) -> None:
    html, _ = page
    prov = html.split('id="sec-provenance"')[1].split("<h2")[0]
    for key in ("generated", "command", "host", "working directory", "compress commit"):
        assert f"<dt>{key}</dt>" in prov
    assert "<dd>testhost</dd>" in prov
    assert re.search(r"<dd>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d UTC</dd>", prov)
    assert "# my comment stays" in html  # the file as written, comments included
    assert html.count('href="variants/int8/">saved model</a>') == 1  # only saved models
    assert 'href="variants/slow/' not in html


def test_numbers_are_rounded_and_stages_are_text(page) -> None:
    html, _ = page
    summary = html.split('id="sec-summary"')[1].split("<h2")[0]
    assert "41.30" in summary and "41.300000000000004" not in html.split("<svg")[0]
    assert "0.150" in summary and "0.15000000000000002" not in summary
    assert "prune 50% magnitude -&gt; distill 60 steps -&gt; int8" in summary
    assert "NOISY" in summary
    # every number in the summary cells has at most 3 decimals
    cells = re.findall(r"<td[^>]*>([^<]*)", summary)
    assert not [c for c in cells if re.search(r"\d\.\d{4,}", c)]


def test_empty_columns_are_left_out() -> None:
    base, int8, failed = fake_rows()
    base.pop("gpu_peak_bytes")
    int8.pop("gpu_peak_bytes")
    html = render_html(
        add_ratios([base, int8, failed]),
        title="t",
        recipe_text="",
        definitions={},
        environment={},
    )
    assert "GPU peak MB" not in html and "peak RSS MB" in html
    with_gpu = render_html(fake_rows(), title="t", recipe_text="", definitions={}, environment={})
    assert "GPU peak MB" in with_gpu


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.15000000000000002, "0.15"), (1234567.891, "1,234,568"), (3.14159, "3.142"), (7, "7")],
)
def test_format_value_rounds(value, text) -> None:
    assert format_value(value) == text


def test_latency_outlier_does_not_flatten_the_rest() -> None:
    svg = latency_chart(add_ratios(rows())).decode()
    # log scale, the 35x ratio clipped at the edge and written, the noisy one called so
    assert "35.00× NOISY (off scale)" in svg
    assert "0.48×" in svg


def test_scatter_labels_do_not_overlap() -> None:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [(1.0, 41.3), (1.02, 41.35), (0.98, 41.32), (1.01, 41.28), (3.0, 45.0)]
    ax.scatter(*zip(*points))
    ax.margins(x=0.25, y=0.2)
    boxes = place_labels(ax, points, ["baseline", "int8", "int8-b", "nf4-variant", "far"])
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    svg = scatter_charts(rows())
    assert [t for t, _ in svg] == ["Perplexity vs latency", "Perplexity vs weight size"]


def test_layer_charts_one_line_per_variant_and_grouped_when_many() -> None:
    charts = layer_charts({"baseline": layers(32.0, 0.0), "int8": layers(8.5, 0.5), "x": None})
    assert [t for t, _ in charts] == ["Sparsity per layer", "Bits per weight per layer"]
    svg = charts[1][1].decode()
    assert "blocks.1.mlp.fc_out" in svg and ">int8<" in svg.replace(" ", "")
    many = [
        {"module": f"blocks.{i}.fc{j}", "weights": 10, "zeros": 5}
        | {"sparsity": 0.5, "weight_bytes": 10, "bits_per_weight": 8.0}
        for i in range(12)
        for j in range(6)
    ]
    grouped = layer_charts({"v": many})[0][1].decode()
    assert "summed per block" in grouped and "blocks.11" in grouped and "fc3" not in grouped
    assert layer_charts({"v": None}) == []


def test_inline_svg_prefixes_ids() -> None:
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10pt" '
    svg += b'height="5pt" viewBox="0 0 10 5"><defs><clipPath id="p1"/></defs>'
    svg += b'<g clip-path="url(#p1)"><use xlink:href="#p1"/></g></svg>'
    out = inline_svg(svg, "f9")
    assert out.startswith("<svg") and "http://" not in out and 'width="10pt"' not in out
    assert 'id="f9-p1"' in out and "url(#f9-p1)" in out and 'href="#f9-p1"' in out
