from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.evaluate.perplexity import perplexity, windows


def scored_targets(n: int, seq_len: int, stride: int) -> list[int]:
    out = []
    for begin, end, score_from in windows(n, seq_len, stride):
        assert 0 <= begin < score_from < end <= n and end - begin <= seq_len
        out += list(range(score_from, end))
    return out


@pytest.mark.parametrize(
    "n,seq_len,stride",
    [(10, 4, 2), (100, 7, 3), (5, 4, 1), (65, 16, 5), (64, 16, 15)],
)
def test_overlapping_windows_score_every_target_exactly_once(
    n: int, seq_len: int, stride: int
) -> None:
    assert scored_targets(n, seq_len, stride) == list(range(1, n))


@pytest.mark.parametrize("n,seq_len", [(10, 4), (9, 4), (64, 16), (65, 16)])
def test_disjoint_windows_leave_out_each_window_start(n: int, seq_len: int) -> None:
    # stride == seq_len: a window's first token has no context inside it (as in the HF guide)
    starts = set(range(seq_len, n, seq_len))
    assert scored_targets(n, seq_len, seq_len) == [t for t in range(1, n) if t not in starts]


def test_windows_follow_the_hugging_face_guide() -> None:
    # begin in range(0, n, stride); end = min(begin + seq_len, n); stop once end == n
    assert windows(10, 4, 3) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    assert windows(11, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 11, 9)]


def test_overlapping_windows_give_context() -> None:
    spans = windows(100, 10, 5)
    # After the first window, scored targets have at least seq_len - stride tokens of context.
    assert all(score_from - begin >= 5 for begin, _, score_from in spans[1:])


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


class Bigram(nn.Module):
    """Logits depend only on the current token: perplexity is computable by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(
            torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def test_uniform_model_has_perplexity_equal_to_vocab_size() -> None:
    ids = torch.randint(0, 50, (1000,))
    res = perplexity(Uniform(50), ids, seq_len=32, stride=32, batch_size=4)
    assert res.perplexity == pytest.approx(50, rel=1e-5)
    assert res.tokens == 999 - 31  # 32 windows, the first token of each not scored


@pytest.mark.parametrize("stride", [16, 7])
def test_matches_hand_computed_token_weighted_nll(stride: int) -> None:
    ids = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(1))
    model = Bigram(20)
    logp = F.log_softmax(model.table, dim=-1)
    t = torch.tensor(scored_targets(500, 16, stride))
    expected = -logp[ids[t - 1], ids[t]].double().mean().item()
    res = perplexity(model, ids, seq_len=16, stride=stride, batch_size=3)
    assert res.nll == pytest.approx(expected, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert res.tokens == len(t)


def test_max_tokens_caps_the_stream() -> None:
    ids = torch.randint(0, 20, (500,))
    assert perplexity(Uniform(20), ids, 16, stride=8, max_tokens=100).tokens == 99


@pytest.mark.parametrize("stride", [16, 7])
def test_per_window_sums_add_up_in_window_order(stride: int) -> None:
    ids = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(2))
    model = Bigram(20)
    logp = F.log_softmax(model.table, dim=-1)
    res = perplexity(model, ids, seq_len=16, stride=stride, batch_size=3)
    spans = windows(500, 16, stride)
    assert len(res.window_nll) == len(res.window_tokens) == res.windows == len(spans)
    assert sum(res.window_tokens) == res.tokens
    assert math.fsum(res.window_nll) / res.tokens == pytest.approx(res.nll, rel=1e-12)
    for (_, end, score_from), nll, n in zip(spans, res.window_nll, res.window_tokens):
        t = torch.arange(score_from, end)
        assert n == end - score_from
        assert nll == pytest.approx(-logp[ids[t - 1], ids[t]].double().sum().item(), rel=1e-6)
    assert "window_nll" not in res.to_dict()
