"""The terminal summary shows each comparison's interval and says which numbers are noise."""

from __future__ import annotations

from compress.recipe import recipe_from_dict
from compress.run import noise_notes, summary_lines, summary_table

ROWS = [
    {"variant": "baseline", "status": "ok", "perplexity": 129.3, "latency_ratio": 1.0},
    {
        "variant": "int8",
        "status": "ok",
        "perplexity": 129.4,
        "ppl_delta": 0.1,
        "ppl_delta_lo": -0.05,
        "ppl_delta_hi": 0.25,
        "ppl_within_noise": True,
        "latency_ratio": 1.55,
        "latency_ratio_lo": 0.9,
        "latency_ratio_hi": 2.4,
        "latency_noisy": True,
        "latency_rounds": 48,
        "load_avg_before": 5.2,
        "load_avg_after": 6.0,
    },
    {
        "variant": "dyn",
        "status": "ok",
        "perplexity": 131.0,
        "ppl_delta": 1.7,
        "ppl_delta_lo": 1.2,
        "ppl_delta_hi": 2.2,
        "ppl_within_noise": False,
        "latency_ratio": 0.52,
        "latency_ratio_lo": 0.51,
        "latency_ratio_hi": 0.53,
        "latency_noisy": False,
    },
]


def test_summary_table_shows_intervals_and_flags() -> None:
    lines = summary_table(ROWS).splitlines()
    int8 = next(line for line in lines if line.startswith("int8"))
    dyn = next(line for line in lines if line.startswith("dyn"))
    assert "+0.10 [-0.05,+0.25]~" in int8  # ~: the interval contains 0
    assert "1.550*" in int8  # *: the latency ratio is noisy
    assert "+1.70 [+1.20,+2.20]" in dyn and "~" not in dyn
    assert "0.520" in dyn and "*" not in dyn


def _recipe():
    return recipe_from_dict({"name": "x", "variants": [{"name": "v", "pipeline": [{"int8": {}}]}]})


WIDE = [
    {
        **row,
        "latency_ms": 1234.567,
        "latency_iqr_ms": 98.765,
        "weight_bytes_ratio": 0.2631,
        "peak_rss_bytes": 1_412_000_000,
        "gpu_peak_bytes": 812_000_000,
        "top1_accuracy": 0.3123,
        "chrf_fidelity": 88.12,
    }
    for row in ROWS
] + [
    {
        "variant": "a-variant-with-a-name-of-forty-characters",
        "status": "failed",
        "error": "RecipeError: variants[3].pipeline[0].prune.targets: no module matches "
        + "transformer.h.0.attn.c_proj " * 6,
    },
    {
        "variant": "big-ppl",
        "status": "ok",
        "perplexity": 123456.7,
        "ppl_delta": 123327.4,
        "ppl_delta_lo": 120000.1,
        "ppl_delta_hi": 130000.9,
        "latency_ratio": 12.5,
        "latency_noisy": True,
        "latency_ratio_lo": 1.0,
        "latency_ratio_hi": 30.0,
        "latency_rounds": 3,
    },
]


def test_summary_fits_80_columns_with_a_failed_variant_and_noisy_latency() -> None:
    lines = summary_lines(WIDE, _recipe())
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    table = summary_table(WIDE).splitlines()
    assert table[0].split()[0] == "variant" and "status" in table[0]
    assert len(table) == 2 + len(WIDE)  # every variant has its row
    assert any(line.startswith("a-variant-with") and "FAILED" in line for line in table)
    text = "\n".join(lines)
    assert "FAILED a-variant-with-a-name-of-forty-characters: RecipeError" in text
    assert "noise: int8: latency ratio 1.550 is NOISY" in " ".join(lines)
    assert "big-ppl" in text and "12.500*" in text


def test_legend_names_every_mark_of_the_shown_columns() -> None:
    lines = summary_lines(ROWS, _recipe())
    words = " ".join(line.strip() for line in lines)
    assert "ppl = perplexity" in words
    assert "[a,b] = 95% confidence interval" in words
    assert "~ = within noise" in words
    assert "* = noisy" in words
    assert "x = ratio to the baseline" in words


def test_a_narrow_terminal_drops_columns_not_rows() -> None:
    wide = summary_table(WIDE, width=200).splitlines()
    narrow = summary_table(WIDE, width=60).splitlines()
    assert len(narrow[0].split("  ")) < len(wide[0].split("  "))
    assert len(narrow) == len(wide)
    assert "GPU MB" in wide[0] and "GPU MB" not in narrow[0]


def test_noise_notes_name_the_untrustworthy_numbers() -> None:
    recipe = recipe_from_dict(
        {"name": "x", "variants": [{"name": "v", "pipeline": [{"int8": {}}]}]}
    )
    notes = noise_notes(ROWS, recipe)
    assert notes == [
        "noise: int8: latency ratio 1.550 is NOISY (95% CI 0.900-2.400, wider than ±3% after "
        "48 rounds; load average 5.2 -> 6.0)",
        "noise: int8: perplexity change +0.100 is within noise (95% CI -0.050 to +0.250 "
        "contains 0)",
    ]


def test_say_wraps_at_80_columns_keeping_the_indent(capsys) -> None:
    from compress.run import say

    line = "trial   7 [sampled] perplexity 240.06  latency_ratio 1.000x  weight_bytes 0.70 MB"
    say(line + "  prune(sparsity=0.5) -> int8", indent="  ")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(len(x) <= 80 for x in out)
    assert out[0].startswith("  trial   7") and out[1].startswith("    ")
    words = " ".join(x.strip() for x in out).split()
    assert words == (line + "  prune(sparsity=0.5) -> int8").split()  # nothing lost
