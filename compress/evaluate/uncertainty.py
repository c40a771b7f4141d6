"""Bootstrap 95% confidence intervals for the numbers a run compares: a latency ratio and a
perplexity, and a perplexity's difference to the baseline's on the same windows.

Percentile bootstrap, seeded, so the same samples always give the same interval. The unit that
is resampled is the one that is independent: a round of paired timings (the baseline's and the
variant's forward pass timed back to back, so drift hits both), or a scoring window of the
perplexity (its summed negative log-likelihood and its token count); paired numbers are
resampled together, which keeps their pairing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval ``[lo, hi]``."""

    estimate: float
    lo: float
    hi: float

    @property
    def relative_half_width(self) -> float:
        """Half the interval's width over the estimate (inf for a zero estimate)."""
        return (self.hi - self.lo) / 2 / abs(self.estimate) if self.estimate else float("inf")

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def to_dict(self) -> dict:
        return asdict(self)


def _bounds(boot: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _indices(n: int, seed: int, resamples: int) -> np.ndarray:
    """(resamples, n) indices drawn with replacement."""
    if n < 1:
        raise ValueError("need at least one sample to bootstrap")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def ratio_of_medians(
    baseline: Sequence[float],
    variant: Sequence[float],
    seed: int = 0,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
) -> Interval:
    """median(variant) / median(baseline), with rounds (pairs ``baseline[i], variant[i]``)
    resampled together."""
    b = np.asarray(baseline, dtype=float)
    v = np.asarray(variant, dtype=float)
    if b.shape != v.shape:
        raise ValueError(f"paired samples differ in length: {b.size} vs {v.size}")
    idx = _indices(b.size, seed, resamples)
    boot = np.median(v[idx], axis=1) / np.median(b[idx], axis=1)
    return Interval(float(np.median(v) / np.median(b)), *_bounds(boot, level))


def perplexity_interval(
    window_nll: Sequence[float],
    window_tokens: Sequence[int],
    seed: int = 0,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
) -> Interval:
    """exp(sum of NLL / sum of tokens) over windows resampled with replacement."""
    nll = np.asarray(window_nll, dtype=float)
    tok = np.asarray(window_tokens, dtype=float)
    idx = _indices(nll.size, seed, resamples)
    boot = np.exp(nll[idx].sum(1) / tok[idx].sum(1))
    return Interval(float(np.exp(nll.sum() / tok.sum())), *_bounds(boot, level))


def perplexity_difference(
    window_nll: Sequence[float],
    baseline_nll: Sequence[float],
    window_tokens: Sequence[int],
    seed: int = 0,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
) -> Interval:
    """Perplexity of the variant minus the baseline's, both scored on the same windows, with
    the same windows resampled for both (paired). A model against itself gives exactly 0."""
    nll = np.asarray(window_nll, dtype=float)
    base = np.asarray(baseline_nll, dtype=float)
    tok = np.asarray(window_tokens, dtype=float)
    if not nll.shape == base.shape == tok.shape:
        raise ValueError(
            f"windows differ: {nll.size} variant, {base.size} baseline, {tok.size} token counts"
        )
    idx = _indices(nll.size, seed, resamples)
    t = tok[idx].sum(1)
    boot = np.exp(nll[idx].sum(1) / t) - np.exp(base[idx].sum(1) / t)
    estimate = float(np.exp(nll.sum() / tok.sum()) - np.exp(base.sum() / tok.sum()))
    return Interval(estimate, *_bounds(boot, level))
