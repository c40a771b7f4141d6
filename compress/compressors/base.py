"""What every compressor shares: its config base class, its report, and the registry.

A compressor is a small validated config plus one function ``apply(model, config, ctx)`` that
returns the (possibly new) model and a :class:`StageReport`. Registering it is one decorator:

    @register("int8", Int8Config)
    def apply_int8(model, cfg, ctx): ...

The recipe refers to it by that name (``pipeline: [{int8: {threshold: 6.0}}]``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from compress.data.calibration import CalibrationSpec
from compress.evaluate.memory import module_weight_bytes, param_count
from compress.settings import DataSpec
from compress.train import TrainConfig

TokenLoader = Callable[[DataSpec], dict[str, torch.Tensor]]
"""Token ids per split (train, valid, test) of a corpus, in the run's tokenizer."""
Sensitivity = Callable[[nn.Module], dict[str, list[tuple[float, float]]]]
"""Per linear layer (by module name): (sparsity, perplexity increase) when only it is pruned,
at each scanned sparsity."""


class StageConfig(BaseModel):
    """Base for compressor configs: unknown keys are rejected, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def describe(self) -> str:
        """Short text for tables: the non-default settings, e.g. ``threshold=4.0``."""
        return ", ".join(f"{k}={v}" for k, v in self.model_dump(exclude_defaults=True).items())


@dataclass
class StageContext:
    """Runtime inputs a stage may need; never written back onto configs.

    ``tokens`` maps split names to 1-D token tensors; ``models`` holds the models built so far in
    this run by variant name ("baseline" first), e.g. teachers for distillation; ``seed`` makes
    stochastic stages reproducible; ``progress`` shows progress bars for long stages.
    ``calibration`` is the recipe's calibration setting (a stage may override it) and
    ``fingerprint`` identifies the corpus and tokenizer that made ``tokens`` (cache keys);
    ``train`` is the run's own training settings (the baseline's), which a training stage
    defaults to;
    ``load_tokens`` gives another corpus's token ids in the run's tokenizer;
    ``sensitivity(model)`` gives each linear layer's perplexity increase when only it is
    pruned, at each scanned sparsity (a sensitivity scan, :mod:`compress.scan`), for stages
    that allocate sparsity by it.
    """

    seed: int = 0
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)
    progress: bool = False
    calibration: CalibrationSpec | None = None
    fingerprint: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    load_tokens: TokenLoader | None = None
    sensitivity: Sensitivity | None = None


@dataclass
class StageReport:
    stage: str
    config: dict
    touched: list[dict] = field(default_factory=list)  # {"module", "from", "to", ...}
    skipped: list[dict] = field(default_factory=list)  # {"module", "reason"}
    params_before: int = 0
    params_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    touched_bytes_before: int = 0  # bytes of the touched modules before the stage
    touched_bytes_after: int = 0  # ... and after
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. bits per weight, sparsity
    # A stage that trains: one record per optimizer step (see compress.train.StepLog)
    curve: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


ApplyFn = Callable[[nn.Module, Any, StageContext], tuple[nn.Module, StageReport]]


@dataclass(frozen=True)
class Compressor:
    name: str
    config_cls: type[StageConfig]
    apply: ApplyFn
    summary: str


REGISTRY: dict[str, Compressor] = {}


def register(name: str, config_cls: type[StageConfig]) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``fn`` as the compressor ``name`` whose settings are ``config_cls``."""

    def deco(fn: ApplyFn) -> ApplyFn:
        if name in REGISTRY:
            raise ValueError(f"compressor {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        REGISTRY[name] = Compressor(name, config_cls, fn, summary)
        return fn

    return deco


def run_stage(
    name: str, model: nn.Module, cfg: StageConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Apply one registered stage and fill in the before/after accounting of its report."""
    comp = REGISTRY[name]
    params_before, bytes_before = param_count(model), module_weight_bytes(model)
    start = time.perf_counter()
    model, report = comp.apply(model, cfg, ctx)
    report.seconds = time.perf_counter() - start
    report.params_before, report.weight_bytes_before = params_before, bytes_before
    report.params_after, report.weight_bytes_after = param_count(model), module_weight_bytes(model)
    return model, report
