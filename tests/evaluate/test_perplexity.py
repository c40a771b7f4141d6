from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.evaluate.perplexity import perplexity, windows


@pytest.mark.parametrize(
    "n,seq_len,stride",
    [(10, 4, 4), (10, 4, 2), (9, 4, 4), (100, 7, 3), (5, 4, 1), (64, 16, 16), (65, 16, 5)],
)
def test_every_target_is_scored_exactly_once(n: int, seq_len: int, stride: int) -> None:
    scored = []
    for begin, score_from in windows(n, seq_len, stride):
        assert 0 <= begin and begin + seq_len + 1 <= n
        scored += [begin + 1 + p for p in range(score_from, seq_len)]
    assert sorted(scored) == list(range(1, n))


def test_overlapping_windows_give_context() -> None:
    spans = windows(100, 10, 5)
    # After the first window, scored targets have at least seq_len - stride tokens of context.
    assert all(score_from >= 5 for _, score_from in spans[1:])


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
    assert res.tokens == 999


@pytest.mark.parametrize("stride", [16, 7])
def test_matches_hand_computed_token_weighted_nll(stride: int) -> None:
    ids = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(1))
    model = Bigram(20)
    logp = F.log_softmax(model.table, dim=-1)
    expected = -logp[ids[:-1], ids[1:]].double().mean().item()
    res = perplexity(model, ids, seq_len=16, stride=stride, batch_size=3)
    assert res.nll == pytest.approx(expected, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert res.tokens == 499


def test_max_tokens_caps_the_stream() -> None:
    ids = torch.randint(0, 20, (500,))
    assert perplexity(Uniform(20), ids, 16, max_tokens=100).tokens == 99
