"""Fine-tuning: plain next-token training of the current model, on another corpus or the run's.

    - finetune:
        data: {corpus: files, files: [shakespeare.txt]}   # default: the run's own corpus
        train: {max_steps: 300, lr: 5e-4}                  # the rest: the recipe's train settings

The corpus is read with the run's tokenizer (so the model's vocabulary still fits) and split as
the recipe's ``data`` section would split it. ``train`` takes the keys of the recipe's ``train``
section; every key left out takes the recipe's value, so ``finetune: {data: ...}`` trains the
way the baseline was trained. Training is the project's one loop (:func:`compress.train.train`);
weights that are exactly zero stay zero (``keep_sparsity``), so a pruned model stays pruned.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn
from pydantic import field_validator

from compress.compressors.base import StageContext, StageReport, register
from compress.compressors.training import (
    TrainingStageConfig,
    all_trainable,
    sparsity_keeper,
    trainable_parameters,
)
from compress.errors import CompressError
from compress.settings import DataSpec
from compress.train import estimate_loss, train


class FinetuneConfig(TrainingStageConfig):
    data: DataSpec | None = None  # None: the run's own corpus
    keep_sparsity: bool = True

    @field_validator("data")
    @classmethod
    def _no_vocab(cls, data: DataSpec | None) -> DataSpec | None:
        if data is not None and "vocab_size" in data.model_fields_set:
            raise ValueError("vocab_size: fine-tuning reads the corpus with the run's tokenizer")
        return data

    def describe(self) -> str:
        """e.g. ``data=files shakespeare.txt, max_steps=300``: the corpus and the training keys
        given (the others are the run's)."""
        parts = [f"data={self.data_description()}"] if self.data is not None else []
        parts += [f"{k}={v}" for k, v in self.given_train().items()]
        if not self.keep_sparsity:
            parts.append("keep_sparsity=False")
        return ", ".join(parts)

    def data_description(self) -> str:
        if self.data is None:
            return "the run's corpus"
        if self.data.corpus == "files":
            files = self.data.files
            names = files if isinstance(files, list) else [f for v in files.values() for f in v]
            return "files " + ", ".join(names or [])
        if self.data.corpus == "hf":
            return f"dataset {self.data.path}" + (f"/{self.data.name}" if self.data.name else "")
        return "the built-in corpus"


@register("finetune", FinetuneConfig)
def apply_finetune(
    model: nn.Module, cfg: FinetuneConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Next-token training of the current model on a corpus (pre-train, then fine-tune)."""
    if cfg.data is None:
        tokens = ctx.tokens
    elif ctx.load_tokens is None:
        raise CompressError("finetune: this run cannot load another corpus")
    else:
        tokens = ctx.load_tokens(cfg.data)
    for split in ("train", "valid"):
        if split not in tokens or tokens[split].numel() == 0:
            raise CompressError(f"finetune: {cfg.data_description()} has no {split!r} tokens")
    params = trainable_parameters(model, "finetune")
    masked, keep_zeros = sparsity_keeper(params) if cfg.keep_sparsity else (0, None)
    train_cfg = cfg.train_config(ctx.train)
    before = estimate_loss(model, tokens["valid"], train_cfg)
    curve: list[dict] = []
    with all_trainable(params):
        result = train(
            model,
            tokens["train"],
            train_cfg,
            val_ids=tokens["valid"],
            desc="finetune",
            progress=ctx.progress,
            on_step=keep_zeros,
            on_log=curve.append,
        )
    model.eval()
    report = StageReport(stage="finetune", config=cfg.model_dump(), curve=curve)
    report.touched = [
        {
            "module": "(whole model)",
            "from": "current",
            "to": "fine-tuned",
            "data": cfg.data_description(),
        }
    ]
    report.extra.update(
        data=cfg.data_description(),
        train=dataclasses.asdict(train_cfg),  # the settings used, the run's filled in
        val_loss_before=before,
        val_loss_after=estimate_loss(model, tokens["valid"], train_cfg),
        steps=result.steps,
        tokens_seen=result.tokens_seen,
        stopped_by=result.stopped_by,
        best_step=result.best_step,
        train_seconds=result.seconds,
        masked_tensors=masked,
    )
    return model, report
