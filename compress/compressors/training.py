"""What the stages that train a model share: their training settings (one ``train`` section,
the recipe's keys), which parameters train, and keeping pruned weights at zero while they do."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from pydantic import field_serializer, field_validator

from compress.compressors.base import StageConfig
from compress.errors import CompressError
from compress.settings import TrainSpec
from compress.train import TrainConfig


class TrainingStageConfig(StageConfig):
    """Base for the configs of stages that train (``distill``, ``finetune``).

    ``train`` takes the keys of the recipe's ``train`` section; every key left out takes the
    run's value (the baseline's training settings), so the one training config is the
    recipe's, nested here, not re-declared with other defaults.
    """

    train: TrainSpec = TrainSpec()

    @field_validator("train")
    @classmethod
    def _stage_keys(cls, train: TrainSpec) -> TrainSpec:
        if "partial" in train.model_fields_set:
            raise ValueError("partial: only the baseline's training is cached and resumed")
        return train

    @field_serializer("train")
    def _given_only(self, train: TrainSpec) -> dict:
        # the keys left out take the run's values, not TrainSpec's defaults: a dump (the stage
        # report, the recipe written into the report) keeps only what was given
        return self.given_train()

    def given_train(self) -> dict:
        """The training keys this stage gives (the others are the run's)."""
        return self.train.model_dump(include=self.train.model_fields_set)

    def train_config(self, run: TrainConfig) -> TrainConfig:
        """The run's training settings with the keys this stage gives replaced."""
        return dataclasses.replace(run, **self.given_train())

    def describe(self) -> str:
        """The non-default settings and the training keys given, e.g. ``alpha=1.0,
        max_steps=300``."""
        rest = self.model_dump(exclude_defaults=True, exclude={"train"})
        return ", ".join(f"{k}={v}" for k, v in {**rest, **self.given_train()}.items())


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
