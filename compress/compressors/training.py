"""What the stages that train a model share: which parameters train, and keeping pruned
weights at zero while they do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from compress.errors import CompressError


def trainable_parameters(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """The floating-point parameters of ``model``; a model with quantized (bitsandbytes)
    layers cannot be trained, and ``stage`` says which stage must move before quantization."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [n for n, m in model.named_modules() if type(m).__name__.startswith("Linear8bit")]
    frozen += [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    if frozen:
        raise CompressError(
            f"{stage}: the model has quantized layers ({frozen[0]}, ...) that cannot be trained; "
            f"put {stage} before quantization in the pipeline"
        )
    return params


def sparsity_keeper(params: list[nn.Parameter]) -> tuple[int, Callable[[], None] | None]:
    """(number of masked tensors, a callback for ``train(on_step=...)`` that sets the weights
    that are exactly zero now back to zero after every step; None when nothing is zero)."""
    masks = [(p, p != 0) for p in params if p.dim() >= 2 and bool((p == 0).any())]
    if not masks:
        return 0, None

    def reapply() -> None:
        with torch.no_grad():
            for p, mask in masks:
                p.mul_(mask)

    return len(masks), reapply


@contextmanager
def all_trainable(params: list[nn.Parameter]) -> Iterator[None]:
    """Every parameter of ``params`` trains inside the block; each gets its own
    ``requires_grad`` back afterwards, also when training fails."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
