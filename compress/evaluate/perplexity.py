"""Perplexity: exp of the token-weighted mean negative log-likelihood over a held-out stream,
as the Hugging Face guide "Perplexity of fixed-length models" defines it.

Windows of at most ``seq_len`` tokens start every ``stride`` tokens (``begin = 0, stride,
2*stride, ...``; a window ends at ``min(begin + seq_len, n)``, and the last one is the first
that reaches the end of the stream). Each window scores only its new tokens, those after the
previous window's end, each predicted from the tokens before it in the window: so with
``stride < seq_len`` every scored token (after the first window) sees at least
``seq_len - stride`` tokens of context. A window's first token has no context inside it and is
never scored by it: with ``stride == seq_len`` (no overlap) the first token of every window is
left out, as in the guide. The mean is weighted by the tokens actually scored (the guide's
code subtracts one token per window from its count, which is exact only for the first window;
compress counts exactly).

Each window's summed NLL and scored-token count are returned too, in window order: the units a
bootstrap resamples for the perplexity's confidence interval, and, paired window by window, for
its difference to the baseline's (:mod:`compress.evaluate.uncertainty`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import gate
from compress.models.adapter import model_device


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token, in nats
    tokens: int  # number of scored target tokens
    windows: int
    seq_len: int
    stride: int
    seconds: float
    # Per scoring window, in window order: summed NLL (nats) and number of scored tokens.
    window_nll: list[float] = field(default_factory=list, repr=False)
    window_tokens: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """Everything but the per-window lists (reports keep the summary)."""
        out = asdict(self)
        del out["window_nll"], out["window_tokens"]
        return out


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, score_from)`` per window: inputs ``ids[begin:end]``; the targets
    ``ids[t]`` for ``score_from <= t < end`` are scored, each from position ``t - 1 - begin``."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            out.append((begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
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
    device = model_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    window_nll = [0.0] * len(spans)
    window_tokens = [0] * len(spans)
    # Windows of one length are batched together (only the last can be shorter).
    groups: dict[int, list[tuple[int, int, int, int]]] = {}
    for i, span in enumerate(spans):
        groups.setdefault(span[1] - span[0], []).append((*span, i))
    for length, group in groups.items():
        offsets = torch.arange(length)
        positions = torch.arange(length - 1)
        for i in range(0, len(group), batch_size):
            gate.checkpoint()  # let a waiting latency measurement have the machine
            chunk = group[i : i + batch_size]
            begins = torch.tensor([b for b, _, _, _ in chunk])
            first = torch.tensor([s - b - 1 for b, _, s, _ in chunk])  # first scored position
            w = ids[begins[:, None] + offsets]  # (B, T)
            logits = model(w.to(device))[:, :-1]  # (B, T-1, V): position j predicts w[j+1]
            nll = (
                F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)),
                    w[:, 1:].reshape(-1).to(device),
                    reduction="none",
                )
                .view(len(chunk), length - 1)
                .cpu()
            )  # (B, T-1)
            mask = positions[None, :] >= first[:, None]  # (B, T-1)
            sums = torch.where(mask, nll.double(), 0.0).sum(1)  # (B,)
            counts = mask.sum(1)  # (B,)
            for (_, _, _, w_index), w_sum, w_count in zip(chunk, sums, counts):
                window_nll[w_index] = float(w_sum)
                window_tokens[w_index] = int(w_count)
    model.train(was_training)
    total_tokens = sum(window_tokens)
    mean = math.fsum(window_nll) / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=total_tokens,
        windows=len(spans),
        seq_len=seq_len,
        stride=stride,
        seconds=time.perf_counter() - start,
        window_nll=window_nll,
        window_tokens=window_tokens,
    )
