"""Perplexity: exp of the token-weighted mean negative log-likelihood over a held-out stream.

The stream is cut into windows of ``seq_len`` tokens that start every ``stride`` tokens; each
target token is scored exactly once, by the first window that contains it, so with
``stride < seq_len`` every scored token (after the first window) sees at least
``seq_len - stride`` tokens of context. A last window aligned to the end of the stream scores
the tail. ``stride == seq_len`` gives non-overlapping windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import gate


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token, in nats
    tokens: int  # number of scored target tokens
    windows: int
    seq_len: int
    stride: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, score_from)`` per window: inputs ``ids[begin:begin+seq_len]``, and targets at
    window positions ``>= score_from`` are scored. Every target 1..n-1 is scored once."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    if n_tokens < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {n_tokens}")
    out: list[tuple[int, int]] = []
    scored_until = 0  # targets ids[1 : scored_until + 1] are already scored
    begin = 0
    while begin + seq_len + 1 <= n_tokens:
        first_new = scored_until - begin  # window position of the first unscored target
        out.append((begin, max(0, first_new)))
        scored_until = begin + seq_len
        begin += stride
    if scored_until < n_tokens - 1:
        begin = n_tokens - 1 - seq_len
        out.append((begin, scored_until - begin))
    return out


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on the 1-D token stream ``ids``."""
    stride = stride or seq_len
    if max_tokens is not None:
        ids = ids[:max_tokens]
    spans = windows(ids.numel(), seq_len, stride)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total_nll = 0.0
    total_tokens = 0
    offsets = torch.arange(seq_len + 1)
    positions = torch.arange(seq_len)
    for i in range(0, len(spans), batch_size):
        gate.checkpoint()  # let a waiting latency measurement have the machine
        chunk = spans[i : i + batch_size]
        begins = torch.tensor([b for b, _ in chunk])
        score_from = torch.tensor([s for _, s in chunk])
        w = ids[begins[:, None] + offsets]  # (B, T+1)
        logits = model(w[:, :-1])  # (B, T, V)
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="none"
        ).view(len(chunk), seq_len)  # (B, T)
        mask = positions[None, :] >= score_from[:, None]  # (B, T)
        total_nll += float(nll[mask].double().sum())
        total_tokens += int(mask.sum())
    model.train(was_training)
    mean = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=total_tokens,
        windows=len(spans),
        seq_len=seq_len,
        stride=stride,
        seconds=time.perf_counter() - start,
    )
