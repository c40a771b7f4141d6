"""Latency: median and IQR of the wall time of one forward pass, after warm-up.

Batch size, sequence length and torch's intra-op thread count are fixed per run and written into
the report; inputs are fixed token ids so every variant does the same work, and all variants of
a run are timed in alternating rounds so their ratios are side by side.

A variant's ratio to the baseline (:func:`paired_ratio`) comes with a bootstrap 95% confidence
interval over the rounds; rounds go on until the interval is narrow enough (``ci_target``, its
half-width relative to the ratio) or the time budget is spent, and a ratio whose interval is
still wider is marked noisy. The machine's load during the measurement is recorded with it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from compress.evaluate.load import LoadProbe
from compress.evaluate.uncertainty import Interval, ratio_of_medians
from compress.models.adapter import model_device

MAX_ROUNDS = 100_000  # a bound for models so fast that the time budget alone would allow more


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile
    q25_ms: float
    q75_ms: float
    min_ms: float
    batch_size: int
    seq_len: int
    threads: int
    warmup: int
    repeats: int
    samples_ms: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q25, q50, q75 = statistics.quantiles(samples, n=4, method="inclusive")
    return q25, q50, q75


def summarize(
    samples: list[float], batch_size: int, seq_len: int, threads: int, warmup: int
) -> LatencyResult:
    """Median, quartiles and minimum of ``samples`` (ms) taken at the stated settings."""
    q25, q50, q75 = quartiles(samples)
    return LatencyResult(
        q50,
        q75 - q25,
        q25,
        q75,
        min(samples),
        batch_size,
        seq_len,
        threads,
        warmup,
        len(samples),
        list(samples),
    )


@torch.inference_mode()
def interleaved_latency(
    models: dict[str, nn.Module],
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
    enough: Callable[[dict[str, list[float]]], bool] | None = None,
    max_seconds: float | None = None,
) -> dict[str, LatencyResult]:
    """Forward latency of several models measured in alternating rounds.

    Each round times one forward pass of every model, in an order that rotates per round, so
    slow drift of the machine (thermal, other processes) lands on all models alike and their
    ratios stay meaningful. Warm-up passes run first for every model.

    ``repeats`` rounds always run; after them, when ``enough`` is given, rounds continue until
    ``enough(samples)`` is true or ``max_seconds`` (counted from the first timed round) is
    spent. ``enough`` is asked after each further batch of rounds (a quarter of those done).
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randint(
        0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    names = list(models)
    inputs = {n: x.to(model_device(models[n])) for n in names}
    cuda = any(t.device.type == "cuda" for t in inputs.values())
    samples: dict[str, list[float]] = {n: [] for n in names}

    def sync() -> None:
        if cuda:  # kernels run asynchronously: time them to completion
            torch.cuda.synchronize()

    try:
        for n in names:
            models[n].eval()
            for _ in range(warmup):
                models[n](inputs[n])
        start = time.perf_counter()
        r, check_at = 0, repeats
        while r < MAX_ROUNDS:
            if r >= check_at:
                out_of_time = max_seconds is None or time.perf_counter() - start >= max_seconds
                if enough is None or out_of_time or enough(samples):
                    break
                check_at = r + max(1, r // 4)
            k = r % len(names)
            for n in names[k:] + names[:k]:
                sync()
                t0 = time.perf_counter()
                models[n](inputs[n])
                sync()
                samples[n].append((time.perf_counter() - t0) * 1000)
            r += 1
    finally:
        torch.set_num_threads(prev)
    return {n: summarize(s, batch_size, seq_len, threads, warmup) for n, s in samples.items()}


@dataclass(frozen=True)
class PairedLatency:
    """A variant timed against the baseline: both timings, the ratio of their medians with its
    bootstrap confidence interval, and the machine's load meanwhile."""

    baseline: LatencyResult
    variant: LatencyResult
    ratio: Interval
    ci_target: float  # the relative half-width the rounds aimed for
    seconds: float  # wall time of the timed rounds and warm-up
    load: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def alone(
        cls,
        result: LatencyResult,
        ci_target: float,
        seconds: float = 0.0,
        load: dict[str, float | None] | None = None,
    ) -> PairedLatency:
        """The baseline against itself: ratio exactly 1."""
        return cls(result, result, Interval(1.0, 1.0, 1.0), ci_target, seconds, load or {})

    @property
    def rounds(self) -> int:
        return self.variant.repeats

    @property
    def noisy(self) -> bool:
        """The interval stayed wider than the target when the time budget ran out."""
        return self.ratio.relative_half_width > self.ci_target

    def to_dict(self) -> dict:
        return {
            "ratio": self.ratio.to_dict(),
            "noisy": self.noisy,
            "rounds": self.rounds,
            "ci_target": self.ci_target,
            "seconds": self.seconds,
            "load": self.load,
        }


def paired_ratio(
    baseline: nn.Module,
    variant: nn.Module,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    threads: int,
    warmup: int,
    min_rounds: int,
    ci_target: float,
    max_seconds: float,
    seed: int = 0,
) -> PairedLatency:
    """``variant``'s latency relative to ``baseline``'s, from at least ``min_rounds``
    alternating rounds and more until the ratio's 95% interval is within ``ci_target`` of it
    (relative half-width) or ``max_seconds`` of timing is spent."""

    def enough(samples: dict[str, list[float]]) -> bool:
        ci = ratio_of_medians(samples["baseline"], samples["variant"], seed)
        return ci.relative_half_width <= ci_target

    probe = LoadProbe.start()
    start = time.perf_counter()
    timings = interleaved_latency(
        {"baseline": baseline, "variant": variant},
        vocab_size,
        batch_size,
        seq_len,
        threads,
        warmup,
        min_rounds,
        seed=seed,
        enough=enough,
        max_seconds=max_seconds,
    )
    seconds = time.perf_counter() - start
    b, v = timings["baseline"], timings["variant"]
    return PairedLatency(
        b,
        v,
        ratio_of_medians(b.samples_ms, v.samples_ms, seed),
        ci_target,
        seconds,
        probe.finish(),
    )
