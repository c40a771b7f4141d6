"""Teacher-student distillation, for recovering a compressed model or training a smaller one.

The loss is ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``
over next-token distributions softened by temperature ``T`` (Hinton et al., 2015), per token.
Training is the project's one loop (:func:`compress.train.train`): AdamW, warm-up + cosine,
gradient clipping, optional bf16 autocast, a budget in steps and/or minutes, early stopping on
validation cross-entropy (best weights restored), progress bar. ``train`` takes the keys of the
recipe's ``train`` section; every key left out takes the recipe's value, e.g.
``distill: {teacher: baseline, train: {max_steps: 300, lr: 1e-3, early_stop_patience: 3}}``.

``student: current`` recovers the model coming out of the previous stages (e.g. after pruning);
weights that are exactly zero stay zero (``keep_sparsity``), so the recovered model keeps its
sparsity. ``student: {n_layer: 2, ...}`` trains a new, smaller built-in GPT (the teacher's
config with these fields replaced), initialised from the seed. The teacher is the baseline or
any variant built earlier in the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from compress.compressors.base import StageContext, StageReport, register
from compress.compressors.training import (
    TrainingStageConfig,
    all_trainable,
    sparsity_keeper,
    trainable_parameters,
)
from compress.errors import CompressError
from compress.models.adapter import adapter_for, families
from compress.models.builtin import STUDENT_FIELDS as BUILTIN_STUDENT_FIELDS
from compress.settings import TrainSpec
from compress.train import estimate_loss, lm_loss, train


class DistillConfig(TrainingStageConfig):
    teacher: str = "baseline"
    student: Literal["current"] | dict[str, int] = "current"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the label cross-entropy")
    temperature: float = Field(2.0, gt=0.0)
    keep_sparsity: bool = True

    @model_validator(mode="before")
    @classmethod
    def _training_keys_nest(cls, data: Any) -> Any:
        # Earlier recipes gave distill's training keys flat, with distill's own defaults; they
        # now go under ``train`` and default to the recipe's. Name the move, not "unknown key".
        if isinstance(data, dict):
            flat = [k for k in data if k in TrainSpec.model_fields]
            if flat:
                given = ", ".join(f"{k}: {data[k]}" for k in flat)
                raise ValueError(
                    f"{', '.join(flat)}: training settings go under train, e.g. "
                    f"distill: {{train: {{{given}}}}}; keys left out take the recipe's train "
                    "settings"
                )
        return data

    @field_validator("student")
    @classmethod
    def _student_fields(cls, v: str | dict[str, int]) -> str | dict[str, int]:
        # The model's family decides which sizes exist (checked again against the model);
        # here: names some family knows, positive integers.
        if isinstance(v, dict):
            known = student_fields()
            bad = sorted(set(v) - set(known))
            if bad or not v:
                raise ValueError(
                    "student must be 'current' or a mapping of model sizes (built-in GPT: "
                    f"{', '.join(BUILTIN_STUDENT_FIELDS)}; Hugging Face models: their config "
                    f"names, e.g. num_hidden_layers); got keys {bad or '(none)'}"
                )
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v.values()):
                raise ValueError("student sizes must be positive integers")
        return v


def student_fields() -> tuple[str, ...]:
    """Every size name some model family accepts for a new student."""
    return tuple(dict.fromkeys(f for a in families().values() for f in a.student_fields()))


def kd_loss(teacher: nn.Module, alpha: float, temperature: float):
    """The distillation loss as a ``loss_fn`` for :func:`compress.train.train`."""

    def loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = student(x)  # (B, T, V)
        vocab = logits.size(-1)
        total = logits.new_zeros(())
        if alpha > 0:
            total = total + alpha * F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        if alpha < 1:
            with torch.no_grad():
                t_logits = teacher(x).float()
            s_logp = F.log_softmax(logits.float().reshape(-1, vocab) / temperature, dim=-1)
            t_logp = F.log_softmax(t_logits.reshape(-1, vocab) / temperature, dim=-1)
            kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")  # per token
            total = total + (1 - alpha) * temperature**2 * kl
        return total

    return loss


def _student(model: nn.Module, cfg: DistillConfig, seed: int) -> nn.Module:
    if cfg.student == "current":
        return model
    return adapter_for(model).student(model, dict(cfg.student), seed)


@register("distill", DistillConfig)
def apply_distill(
    model: nn.Module, cfg: DistillConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Teacher-student distillation: recover the current model or train a smaller student."""
    if cfg.teacher not in ctx.models:
        known = ", ".join(ctx.models) or "(none)"
        raise CompressError(
            f"distill.teacher: unknown model {cfg.teacher!r}; built so far: {known}"
        )
    for split in ("train", "valid"):
        if split not in ctx.tokens:
            raise CompressError(f"distill: needs the {split!r} token split")
    teacher = ctx.models[cfg.teacher].eval()
    student = _student(model, cfg, ctx.seed)
    params = trainable_parameters(student, "distill")
    masked, keep_zeros = 0, None
    if cfg.keep_sparsity and cfg.student == "current":
        masked, keep_zeros = sparsity_keeper(params)
    for p in teacher.parameters():
        p.requires_grad_(False)
    train_cfg = cfg.train_config(ctx.train)
    before = estimate_loss(student, ctx.tokens["valid"], train_cfg, lm_loss)
    curve: list[dict] = []
    with all_trainable(params):
        result = train(
            student,
            ctx.tokens["train"],
            train_cfg,
            val_ids=ctx.tokens["valid"],
            loss_fn=kd_loss(teacher, cfg.alpha, cfg.temperature),
            val_loss_fn=lm_loss,
            desc="distill",
            progress=ctx.progress,
            on_step=keep_zeros,
            on_log=curve.append,
        )
    student.eval()
    report = StageReport(stage="distill", config=cfg.model_dump(), curve=curve)
    report.touched = [
        {
            "module": "(whole model)",
            "from": "student" if cfg.student != "current" else "current",
            "to": "distilled",
            "teacher": cfg.teacher,
        }
    ]
    report.extra.update(
        teacher=cfg.teacher,
        student="current" if cfg.student == "current" else dict(cfg.student),
        train=dataclasses.asdict(train_cfg),  # the settings used, the run's filled in
        val_loss_before=before,
        val_loss_after=estimate_loss(student, ctx.tokens["valid"], train_cfg, lm_loss),
        steps=result.steps,
        stopped_by=result.stopped_by,
        best_step=result.best_step,
        train_seconds=result.seconds,
        masked_tensors=masked,
    )
    return student, report
