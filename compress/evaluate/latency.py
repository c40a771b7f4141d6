"""Latency: median and IQR of the wall time of one forward pass, after warm-up.

Batch size, sequence length and torch's intra-op thread count are fixed per run and written into
the report; inputs are fixed token ids so every variant does the same work, and all variants of
a run are timed in alternating rounds so their ratios are side by side.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from compress.models.adapter import model_device


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
) -> dict[str, LatencyResult]:
    """Forward latency of several models measured in alternating rounds.

    Each round times one forward pass of every model, in an order that rotates per round, so
    slow drift of the machine (thermal, other processes) lands on all models alike and their
    ratios stay meaningful. Warm-up passes run first for every model.
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
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                sync()
                t0 = time.perf_counter()
                models[n](inputs[n])
                sync()
                samples[n].append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(prev)
    return {n: summarize(s, batch_size, seq_len, threads, warmup) for n, s in samples.items()}
