"""The one training loop: baseline training, recovery fine-tuning and distillation all use it.

AdamW, linear warm-up then cosine decay, gradient clipping, optional bf16 autocast, a budget in
steps and/or minutes, periodic validation with optional early stopping, and a progress bar.
The loss is pluggable (``loss_fn``) so distillation reuses the loop unchanged.

A run can stop before ``max_steps`` (the time cap, or a step cap for this call) and continue
later exactly where it stopped: :class:`TrainState` holds everything the loop carries from one
step to the next (optimizer moments, both random generators, validation bookkeeping), and
resuming from it gives bitwise the same weights as one uninterrupted run on the same machine.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import gate
from compress.models.adapter import model_device
from compress.progress import bar as progress_bar

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
StepLog = Callable[[dict], None]
"""Receives one record per optimizer step: step, train_loss, lr, grad_norm (before clipping),
tokens_per_s (of that step) and, at validation points, val_loss."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 600
    max_minutes: float | None = None  # wall-clock cap; whichever budget ends first stops training
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    bf16: bool = False  # bf16 autocast for forward/backward (weights and optimizer stay fp32)
    eval_every: int = 100
    eval_batches: int = 8
    # Evaluations without improvement before stopping; when set, the best weights seen at a
    # validation point are restored at the end.
    early_stop_patience: int | None = None
    # Hand a resumable state to ``on_checkpoint`` every this many steps (None: only when the
    # run stops before max_steps), so an interrupted run loses at most this many steps.
    checkpoint_every: int | None = None
    seed: int = 0


PARTIAL_STOPS = frozenset({"max_minutes", "step_cap", "interrupted"})
"""How a run ends before its planned steps: the weights are partly trained. A periodic
checkpoint is labelled "interrupted": read back later, it is what a run that never got further
(Ctrl-C, a crash) left behind."""


@dataclass
class TrainReport:
    steps: int
    seconds: float  # training time over every run that led here (resumed runs added up)
    tokens_seen: int
    final_train_loss: float
    best_val_loss: float | None
    # "max_steps", "early_stop" (complete), or "max_minutes", "step_cap", "interrupted" (partial)
    stopped_by: str
    best_step: int  # step of the best validation loss (the weights kept when early stopping)
    history: list[dict] = field(default_factory=list)
    planned_steps: int = 0  # max_steps of the config
    runs: int = 1  # how many calls (the first and each resume) trained these weights

    @property
    def partial(self) -> bool:
        return self.stopped_by in PARTIAL_STOPS

    def to_dict(self) -> dict:
        return {**asdict(self), "partial": self.partial}


@dataclass
class TrainState:
    """What the loop carries from one step to the next, beyond the model's weights."""

    step: int
    optimizer: dict  # ``optimizer.state_dict()``
    torch_rng: torch.Tensor  # the global CPU generator (dropout)
    batch_rng: torch.Tensor  # the generator that draws training windows
    history: list[dict]
    best_val: float | None
    best_step: int
    bad_evals: int
    loss_value: float
    seconds: float  # training time so far, over every run
    runs: int
    best_weights: dict[str, torch.Tensor] | None = None  # kept for early stopping

    _TENSORS = ("optimizer", "torch_rng", "batch_rng", "best_weights")

    def save(self, path: Path) -> None:
        """``path/state.pt`` (tensors, read back with ``weights_only=True``) and
        ``path/state.json`` (the rest)."""
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: getattr(self, k) for k in self._TENSORS}, path / "state.pt")
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._TENSORS}
        (path / "state.json").write_text(json.dumps(rest, indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainState:
        tensors = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        rest = json.loads((path / "state.json").read_text())
        return cls(**rest, **tensors)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the default loss."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def sample_batch(
    ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq_len + 1`` tokens: inputs and next-token targets, (B, T) each."""
    if ids.numel() < seq_len + 2:
        raise ValueError(f"need more than {seq_len + 1} tokens to train, got {ids.numel()}")
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
    offsets = torch.arange(seq_len + 1)
    windows = ids[starts[:, None] + offsets]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def estimate_loss(
    model: nn.Module, ids: torch.Tensor, cfg: TrainConfig, loss_fn: LossFn = lm_loss
) -> float:
    """Mean loss over ``cfg.eval_batches`` fixed (seeded) batches of ``ids``."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = sample_batch(ids, cfg.batch_size, cfg.seq_len, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            losses.append(loss_fn(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    model: nn.Module,
    train_ids: torch.Tensor,
    cfg: TrainConfig,
    val_ids: torch.Tensor | None = None,
    loss_fn: LossFn = lm_loss,
    desc: str = "train",
    progress: bool = True,
    val_loss_fn: LossFn | None = None,
    on_step: Callable[[], None] | None = None,
    resume: TrainState | None = None,
    on_checkpoint: Callable[[nn.Module, TrainState, TrainReport], None] | None = None,
    stop_at: int | None = None,
    on_log: StepLog | None = None,
) -> TrainReport:
    """Train ``model`` in place on random windows of ``train_ids`` and return what happened.

    ``loss_fn`` is what is minimised; ``val_loss_fn`` (default: the same) is what validation and
    early stopping watch, e.g. plain cross-entropy while distilling. ``on_step`` runs after every
    optimizer step, e.g. to keep pruned weights at zero; ``on_log`` receives every step's record
    (see :data:`StepLog`), e.g. for training curves.

    ``resume`` continues a run from the state an earlier call handed to ``on_checkpoint``
    (``model`` must hold that call's weights at that step). ``on_checkpoint(model, state,
    report)`` gets a resumable state every ``cfg.checkpoint_every`` steps and when the run stops
    before ``max_steps`` (time cap, or ``stop_at``: stop this call once that step is done).
    """
    val_loss_fn = val_loss_fn or loss_fn
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    model.train()
    device = model_device(model)
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
    history: list[dict] = []
    best_val: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_step = 0
    bad_evals = 0
    stopped_by = "max_steps"
    loss_value = float("nan")
    step = 0
    seconds_before, runs = 0.0, 1
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.torch_rng)
        gen.set_state(resume.batch_rng)
        step, history, best_val = resume.step, list(resume.history), resume.best_val
        best_step, bad_evals, loss_value = resume.best_step, resume.bad_evals, resume.loss_value
        best_state, seconds_before, runs = resume.best_weights, resume.seconds, resume.runs + 1

    def report(stop: str) -> TrainReport:
        return TrainReport(
            steps=step,
            seconds=seconds_before + time.perf_counter() - start,
            tokens_seen=step * cfg.batch_size * cfg.seq_len,
            final_train_loss=loss_value,
            best_val_loss=best_val,
            stopped_by=stop,
            best_step=best_step,
            history=list(history),
            planned_steps=cfg.max_steps,
            runs=runs,
        )

    def checkpoint() -> None:
        if on_checkpoint is None:
            return
        state = TrainState(
            step=step,
            optimizer=opt.state_dict(),
            torch_rng=torch.get_rng_state(),
            batch_rng=gen.get_state(),
            history=list(history),
            best_val=best_val,
            best_step=best_step,
            bad_evals=bad_evals,
            loss_value=loss_value,
            seconds=seconds_before + time.perf_counter() - start,
            runs=runs,
            best_weights=best_state,
        )
        on_checkpoint(
            model, state, report(stopped_by if stopped_by in PARTIAL_STOPS else "interrupted")
        )

    bar = progress_bar(cfg.max_steps, desc, enabled=progress, unit="step", initial=step)
    try:
        while step < cfg.max_steps:
            gate.checkpoint()  # let a waiting latency measurement have the machine
            if deadline is not None and time.perf_counter() >= deadline:
                stopped_by = "max_minutes"
                break
            if stop_at is not None and step >= stop_at:
                stopped_by = "step_cap"
                break
            step_start = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = sample_batch(train_ids, cfg.batch_size, cfg.seq_len, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(model, x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if cfg.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            elif on_log is not None:
                norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
                grad_norm = torch.stack(norms).norm() if norms else None
            opt.step()
            if on_step is not None:
                on_step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{desc}: loss became {loss_value} at step {step}")
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
            record = {
                "step": step,
                "train_loss": loss_value,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": x.numel() / (time.perf_counter() - step_start),
            }
            if val_ids is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val = estimate_loss(model, val_ids, cfg, val_loss_fn)
                history.append({"step": step, "train_loss": loss_value, "val_loss": val})
                log.info("%s step %d: train %.4f val %.4f", desc, step, loss_value, val)
                record["val_loss"] = val
                if on_log is not None:
                    on_log(record)
                if best_val is None or val < best_val:
                    best_val, best_step, bad_evals = val, step, 0
                    if cfg.early_stop_patience is not None:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_evals += 1
                    if cfg.early_stop_patience is not None and bad_evals >= cfg.early_stop_patience:
                        stopped_by = "early_stop"
                        break
            elif on_log is not None:
                on_log(record)
            every = cfg.checkpoint_every
            if every and step % every == 0 and step < cfg.max_steps:
                checkpoint()
    finally:
        bar.close()
    if stopped_by in PARTIAL_STOPS:
        checkpoint()  # the state to resume from; the weights stay as trained so far
        model.eval()
        return report(stopped_by)
    if best_state is not None and best_step != step:
        model.load_state_dict(best_state)
        log.info("%s: restored the best weights (step %d, val %.4f)", desc, best_step, best_val)
    model.eval()
    return report(stopped_by)
