"""Greedy continuations of held-out prompts, scored with sacrebleu's BLEU and chrF.

Prompts are ``prompts`` windows of the evaluation split, evenly spaced over it: each is
``prompt_tokens`` tokens, followed in the text by the ``new_tokens`` tokens that serve as its
reference continuation. A model continues every prompt greedily (the most likely token each
step, ties to the lowest id) for ``new_tokens`` tokens; the decoded continuations are scored
as one corpus against the decoded references, or against another model's continuations
(fidelity: 100 means the same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from compress import gate
from compress.models.adapter import model_device


@dataclass(frozen=True)
class Prompts:
    prompts: torch.Tensor  # (K, P) token ids
    references: torch.Tensor  # (K, N) the tokens that follow each prompt in the text


@dataclass(frozen=True)
class TextScores:
    bleu: float  # sacrebleu corpus BLEU, 0-100
    chrf: float  # sacrebleu corpus chrF, 0-100

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_prompts(ids: torch.Tensor, count: int, prompt_tokens: int, new_tokens: int) -> Prompts:
    """``count`` prompt/reference pairs from the 1-D stream ``ids``, evenly spaced over it."""
    span = prompt_tokens + new_tokens
    if count < 1:
        raise ValueError(f"need at least one prompt, got {count}")
    if ids.numel() < span:
        raise ValueError(f"need {span} tokens for one prompt and its reference, got {ids.numel()}")
    last = ids.numel() - span
    starts = torch.linspace(0, last, count).round().long() if count > 1 else torch.zeros(1).long()
    windows = ids[starts[:, None] + torch.arange(span)]  # (K, P + N)
    return Prompts(windows[:, :prompt_tokens], windows[:, prompt_tokens:])


@torch.inference_mode()
def greedy(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy next tokens after each prompt: (K, new_tokens) token ids. The whole
    sequence is fed again at every step (no cache), so any model that maps ids to logits works."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    seq = prompts.to(device)  # (K, P)
    for _ in range(new_tokens):
        gate.checkpoint()
        nxt = model(seq)[:, -1].argmax(dim=-1, keepdim=True)  # (K, 1)
        seq = torch.cat([seq, nxt], dim=1)
    model.train(was_training)
    return seq[:, prompts.size(1) :].cpu()


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> TextScores:
    """Corpus BLEU and chrF (sacrebleu's defaults) of ``hypotheses`` against one reference each.

    Texts identical to their references score 100 on both, also where sacrebleu has nothing to
    count (continuations of only whitespace or under four words give BLEU 0 even against
    themselves), so a fidelity of 100 always means the same text."""
    import sacrebleu

    hyps, refs = list(hypotheses), [list(references)]
    if hyps == refs[0]:
        return TextScores(bleu=100.0, chrf=100.0)
    return TextScores(
        bleu=float(sacrebleu.corpus_bleu(hyps, refs).score),
        chrf=float(sacrebleu.corpus_chrf(hyps, refs).score),
    )
