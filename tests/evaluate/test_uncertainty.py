"""Bootstrap intervals: they contain the true value at about their stated rate, a model
against itself differs by exactly 0, and a noisy latency sample is flagged."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.evaluate.latency import PairedLatency, interleaved_latency, paired_ratio, summarize
from compress.evaluate.perplexity import perplexity
from compress.evaluate.uncertainty import (
    Interval,
    perplexity_difference,
    perplexity_interval,
    ratio_of_medians,
)
from compress.metrics import Measurement
from compress.workbench import set_perplexity
from tests.evaluate.test_perplexity import Bigram


def test_latency_ratio_interval_covers_the_true_ratio() -> None:
    # Rounds of a baseline near 10 ms and a variant exactly 0.6x it in distribution, each with
    # multiplicative noise; a shared per-round drift hits both (as on a real machine).
    true_ratio, hits, widths = 0.6, 0, []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        drift = rng.lognormal(0, 0.3, 60)
        base = 10 * drift * rng.lognormal(0, 0.1, 60)
        variant = 10 * true_ratio * drift * rng.lognormal(0, 0.1, 60)
        ci = ratio_of_medians(base, variant, seed=seed, resamples=1000)
        hits += ci.contains(true_ratio)
        widths.append(ci.relative_half_width)
        assert ci.lo <= ci.estimate <= ci.hi
    assert hits / 60 >= 0.85  # nominal 95%; the percentile bootstrap is a little optimistic
    assert 0.01 < float(np.median(widths)) < 0.15


def test_the_interval_is_seeded_and_narrows_with_more_rounds() -> None:
    rng = np.random.default_rng(0)
    base, variant = rng.lognormal(2, 0.2, 400), rng.lognormal(2, 0.2, 400) * 0.5
    again = ratio_of_medians(base, variant, seed=3, resamples=500)
    assert again == ratio_of_medians(base, variant, seed=3, resamples=500)
    few = ratio_of_medians(base[:20], variant[:20], seed=3, resamples=500)
    many = ratio_of_medians(base, variant, seed=3, resamples=500)
    assert many.relative_half_width < few.relative_half_width / 2


def test_a_noisy_sample_is_flagged() -> None:
    rng = np.random.default_rng(1)
    # half the passes take 10x longer (another process had the cores): 20 rounds cannot pin
    # the ratio down to 3%
    base = 10 * np.where(rng.random(20) < 0.5, 1.0, 10.0)
    variant = 8 * np.where(rng.random(20) < 0.5, 1.0, 10.0)
    ci = ratio_of_medians(base, variant)
    assert ci.relative_half_width > 0.2  # far wider than the 3% target
    res_b, res_v = summarize(list(base), 1, 1, 1, 0), summarize(list(variant), 1, 1, 1, 0)
    assert PairedLatency(res_b, res_v, ci, 0.03, 1.0).noisy
    quiet = ratio_of_medians(base * 0 + 10, variant * 0 + 8)
    assert quiet == Interval(0.8, 0.8, 0.8)
    assert not PairedLatency(res_b, res_v, quiet, 0.03, 1.0).noisy


class Jittery(nn.Module):
    """Sleeps 1 ms or 15 ms at random: its timings cannot give a tight ratio."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time.sleep(0.001 if self.rng.random() < 0.5 else 0.015)
        return idx.float()


def test_paired_ratio_marks_a_jittery_measurement_noisy() -> None:
    out = paired_ratio(Jittery(0), Jittery(1), 10, 1, 4, 1, 0, 6, ci_target=0.03, max_seconds=0.3)
    assert out.noisy and out.rounds >= 6
    assert out.baseline.repeats == out.variant.repeats == out.rounds
    assert out.ratio.lo <= out.ratio.estimate <= out.ratio.hi
    assert set(out.load) == {"load_avg_before", "load_avg_after", "cpu_steal"}
    assert out.to_dict()["noisy"] is True


def test_rounds_continue_until_enough() -> None:
    class Instant(nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return idx.float()

    asked = []

    def enough(samples: dict[str, list[float]]) -> bool:
        asked.append(len(samples["a"]))
        return len(samples["a"]) >= 30

    out = interleaved_latency(
        {"a": Instant(), "b": Instant()}, 10, 1, 4, 1, 0, 8, enough=enough, max_seconds=1e9
    )
    # checked after the 8 minimum rounds, then after batches of a quarter of those done
    assert asked == [8, 10, 12, 15, 18, 22, 27, 33]
    assert out["a"].repeats == out["b"].repeats == 33
    out = interleaved_latency({"a": Instant()}, 10, 1, 4, 1, 0, 8, enough=enough, max_seconds=0)
    assert out["a"].repeats == 8  # no time left after the minimum


def test_perplexity_interval_covers_the_true_perplexity() -> None:
    # 80 windows of 50 tokens whose NLLs are iid with mean 3: true perplexity e^3
    hits = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        nll = rng.gamma(2.0, 1.5, size=(80, 50)).sum(1)
        ci = perplexity_interval(nll, [50] * 80, seed=seed, resamples=1000)
        hits += ci.contains(math.exp(3.0))
    assert hits / 60 >= 0.85


def test_a_model_against_itself_differs_by_exactly_zero() -> None:
    ids = torch.randint(0, 20, (600,), generator=torch.Generator().manual_seed(4))
    model = Bigram(20)
    a = perplexity(model, ids, seq_len=16, stride=16, batch_size=4)
    b = perplexity(model, ids, seq_len=16, stride=16, batch_size=3)
    m = Measurement()
    set_perplexity(m, a, b, seed=0)
    assert m.ppl_delta == 0.0 and m.ppl_delta_lo == 0.0 and m.ppl_delta_hi == 0.0
    assert m.ppl_within_noise is True
    assert m.perplexity == pytest.approx(a.perplexity)
    assert m.perplexity_lo < m.perplexity < m.perplexity_hi


def test_a_real_difference_is_not_within_noise() -> None:
    rng = np.random.default_rng(5)
    tokens = np.full(100, 64)
    base = rng.gamma(2.0, 1.5, size=(100, 64)).sum(1)
    worse = base + 0.2 * 64  # every token 0.2 nats worse: perplexity x e^0.2
    ci = perplexity_difference(worse, base, tokens)
    expected = math.exp(worse.sum() / tokens.sum()) - math.exp(base.sum() / tokens.sum())
    assert ci.estimate == pytest.approx(expected)
    assert 0 < ci.lo <= ci.estimate <= ci.hi
    noisy = base + rng.normal(0, 20, 100)  # no shift, only noise
    assert perplexity_difference(noisy, base, tokens).contains(0.0)
