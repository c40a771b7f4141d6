"""Latency: median and IQR of the wall time of one forward pass, after warm-up.

Batch size, sequence length and torch's intra-op thread count are fixed per run and written into
the report; inputs are fixed token ids so every variant does the same work.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


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


@torch.inference_mode()
def forward_latency(
    model: nn.Module,
    vocab_size: int,
    batch_size: int = 8,
    seq_len: int = 256,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
    seed: int = 0,
) -> LatencyResult:
    """Time ``repeats`` forward passes of a ``(batch_size, seq_len)`` batch of token ids."""
    prev_threads = torch.get_num_threads()
    threads = threads or prev_threads
    torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        for _ in range(warmup):
            model(x)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            samples.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(prev_threads)
        model.train(was_training)
    q25, q50, q75 = quartiles(samples)
    return LatencyResult(
        median_ms=q50,
        iqr_ms=q75 - q25,
        q25_ms=q25,
        q75_ms=q75,
        min_ms=min(samples),
        batch_size=batch_size,
        seq_len=seq_len,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        samples_ms=samples,
    )
