"""Next-token top-1 accuracy, and top-1 agreement between two models, on the tokens the
perplexity scores: the same windows (:func:`compress.evaluate.perplexity.windows`), the same
scored positions, each predicted from the same context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from compress import gate
from compress.evaluate.perplexity import windows
from compress.models.adapter import model_device


@dataclass(frozen=True)
class Top1:
    """The model's most likely next token at every scored position, and the true one."""

    predicted: torch.Tensor  # (N,) int64, in scoring order
    targets: torch.Tensor  # (N,) int64

    @property
    def accuracy(self) -> float:
        """Fraction of scored positions whose most likely token is the true next token."""
        return float((self.predicted == self.targets).double().mean())

    def agreement(self, other: Top1) -> float:
        """Fraction of positions where both models' most likely tokens are the same."""
        if other.predicted.shape != self.predicted.shape:
            raise ValueError(
                f"different scored positions: {other.predicted.numel()} vs {self.predicted.numel()}"
            )
        return float((self.predicted == other.predicted).double().mean())


@torch.inference_mode()
def top1(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
) -> Top1:
    """Argmax predictions of ``model`` at every position the perplexity of ``ids`` scores.

    Ties go to the lowest token id (``torch.argmax``), so identical logits give identical
    predictions."""
    stride = stride or seq_len
    spans = windows(ids.numel(), seq_len, stride)
    device = model_device(model)
    was_training = model.training
    model.eval()
    predicted: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    for length, group in groups.items():
        offsets = torch.arange(length)
        positions = torch.arange(length - 1)
        for i in range(0, len(group), batch_size):
            gate.checkpoint()  # let a waiting latency measurement have the machine
            chunk = group[i : i + batch_size]
            begins = torch.tensor([b for b, _, _ in chunk])
            first = torch.tensor([s - b - 1 for b, _, s in chunk])  # first scored position
            w = ids[begins[:, None] + offsets]  # (B, T)
            best = model(w.to(device))[:, :-1].argmax(dim=-1).cpu()  # (B, T-1)
            mask = positions[None, :] >= first[:, None]  # (B, T-1)
            predicted.append(best[mask])
            targets.append(w[:, 1:][mask])
    model.train(was_training)
    return Top1(torch.cat(predicted).long(), torch.cat(targets).long())
