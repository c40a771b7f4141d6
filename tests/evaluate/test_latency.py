from __future__ import annotations

import time

import torch
import torch.nn as nn

from compress.evaluate.latency import interleaved_latency, quartiles


class Sleeper(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return idx.float()


def test_quartiles() -> None:
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_interleaved_rounds_time_every_model_alike() -> None:
    fast, slow = Sleeper(0.002), Sleeper(0.02)
    before = torch.get_num_threads()
    out = interleaved_latency(
        {"fast": fast, "slow": slow},
        vocab_size=10,
        batch_size=2,
        seq_len=4,
        threads=1,
        warmup=2,
        repeats=6,
    )
    assert torch.get_num_threads() == before  # the thread count is restored
    assert fast.calls == slow.calls == 2 + 6
    for name, res in out.items():
        assert len(res.samples_ms) == 6 and res.threads == 1 and res.repeats == 6, name
        assert res.q25_ms <= res.median_ms <= res.q75_ms
        assert res.iqr_ms == res.q75_ms - res.q25_ms
    assert out["slow"].median_ms > 5 * out["fast"].median_ms
    assert out["slow"].min_ms >= 20
