"""``torch.compile`` for a whole model, in place, with the time of the compiling call logged.

Like ``nn.Module.compile()``, :func:`compile_model` sets the module's ``_compiled_call_impl``,
which ``nn.Module.__call__`` runs instead of the eager forward; the module keeps its type, names
and state dict, so saving, counting and adapters see the same model. torch drops the compiled
forward when a module is deep-copied or pickled: a copy runs eagerly (same weights, outputs
within rounding of the compiled ones) until it is compiled again.

Compilation happens at the first call, and again for a call with another input shape (then
with dynamic shapes, which serve every later batch size and sequence length) or grad mode: a
run pays a few compilations per compiled variant. Measure latency only after a warm-up call,
as ``compress.evaluate.latency`` does.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class CompiledForward:
    """The compiled forward of ``module`` (what ``nn.Module.__call__`` runs when it is set as
    ``module._compiled_call_impl``)."""

    def __init__(self, module: nn.Module, dynamic: bool | None = None) -> None:
        self.module = module
        self.dynamic = dynamic
        self.first_call_seconds: float | None = None
        self._fn = torch.compile(module._call_impl, dynamic=dynamic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        with warnings.catch_warnings():
            # torchao's Int8Tensor cannot be keyed in AOT autograd's cache; it says so on every
            # compilation, which only means that cache is not used for it.
            warnings.filterwarnings("ignore", message=r".*_stable_hash_for_caching")
            out = self._fn(*args, **kwargs)
        if self.first_call_seconds is None:
            self.first_call_seconds = time.perf_counter() - start
            log.info(
                "%s: first (compiling) call took %.1f s",
                type(self.module).__name__,
                self.first_call_seconds,
            )
        return out


def compile_model(model: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """Compile ``model``'s forward in place (lazily, at its first call); returns ``model``."""
    model._compiled_call_impl = CompiledForward(model, dynamic)
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def compile_seconds(model: nn.Module) -> float | None:
    """Wall time of the first (compiling) call, once it happened."""
    fn = getattr(model, "_compiled_call_impl", None)
    return getattr(fn, "first_call_seconds", None)


def uncompile(model: nn.Module) -> nn.Module:
    """Run ``model`` eagerly again."""
    model._compiled_call_impl = None
    return model
