"""The terminal summary shows each comparison's interval and says which numbers are noise."""

from __future__ import annotations

from compress.recipe import recipe_from_dict
from compress.run import noise_notes, summary_table

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
    assert "+0.100 [-0.050, +0.250] within noise" in int8
    assert "1.550 [0.900, 2.400] NOISY" in int8
    assert "+1.700 [+1.200, +2.200]" in dyn and "within noise" not in dyn
    assert "0.520 [0.510, 0.530]" in dyn and "NOISY" not in dyn


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
