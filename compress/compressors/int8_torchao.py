"""torchao's int8 linear layers for ``dynamic-int8``: the backend used where torchao is installed.

Each targeted ``nn.Linear`` becomes a :class:`TorchaoInt8Linear` (an ``nn.Linear`` whose weight
torchao's ``quantize_(layer, Int8DynamicActivationInt8WeightConfig(...))`` turned into an
``Int8Tensor``):

- weights: int8 codes in [-128, 127] with one symmetric fp32 scale per output row (or one for
  the whole matrix with ``per_channel: false``) and an int8 zero point (0) beside it;
- activations: quantized symmetrically to int8 on every call, one scale per token (row of the
  input; per tensor with ``per_channel: false``);
- one int8 GEMM with int32 accumulation (``torch._int_mm``), rescaled by both scales.

Eager, the activation quantization runs as a handful of separate elementwise ops per layer;
``torch.compile`` fuses them with the surrounding model (see ``benchmarks/cpu_paths.py``), so
the stage compiles the whole model by default (:mod:`compress.compile`).

Stored form (what a saved variant holds and what ``compress.evaluate.memory`` counts): exactly
the tensors the layer holds: ``weight`` (int8 codes, (out, in)), ``weight_scale`` (fp32, (out,
1) or (1, 1)), ``weight_zero_point`` (int8, same shape), then ``bias`` (fp32) if any. Loading
rebuilds the same ``Int8Tensor`` from them, so a reloaded layer computes identical outputs.

torchao is optional: :func:`import_torchao` returns None where it is missing, and ``dynamic-int8``
then falls back to torch's own dynamically quantized Linear (``compress.compressors.dynamic_int8``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn as nn

from compress.evaluate.memory import SavesPlainTensors

log = logging.getLogger(__name__)

# torchao logs at import that its CUDA-only extensions do not load on a CPU build, and torch
# warns once about an Enum torchao registers for torch.compile; neither concerns CPU inference.
_QUIET_AT_IMPORT = ("torchao", "torch.utils._pytree")


@contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_torchao() -> ModuleType | None:
    """torchao, imported quietly, or None when it is not installed (or does not import)."""
    try:
        with _quiet(_QUIET_AT_IMPORT):
            import torchao
            import torchao.quantization  # noqa: F401
    except ImportError as exc:
        log.debug("torchao unavailable: %s", exc)
        return None
    return torchao


def version() -> str:
    ao = import_torchao()
    return getattr(ao, "__version__", "unknown") if ao is not None else "missing"


def _config(per_channel: bool):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, PerRow, PerTensor

    # set_inductor_config=False: torchao would otherwise change process-wide inductor settings
    # for every model compiled afterwards (the fp32 baseline included).
    return Int8DynamicActivationInt8WeightConfig(
        granularity=PerRow() if per_channel else PerTensor(), set_inductor_config=False
    )


class TorchaoInt8Linear(SavesPlainTensors, nn.Linear):
    """An ``nn.Linear`` whose weight is torchao's ``Int8Tensor`` (int8 weights, dynamic int8
    activations); named for what it is, and describing its stored form for counting/saving."""

    def plain_tensors(self) -> dict[str, torch.Tensor]:
        w = self.weight
        out = {"weight": w.qdata, "weight_scale": w.scale, "weight_zero_point": w.zero_point}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    @property
    def per_channel(self) -> bool:
        return self.weight.scale.numel() > 1 or self.out_features == 1

    def zero_weights(self) -> int:
        return int((self.weight.qdata == 0).sum())


def quantize_linear(lin: nn.Linear, per_channel: bool) -> TorchaoInt8Linear:
    """``lin`` (fp32, CPU) as a :class:`TorchaoInt8Linear`, quantized by torchao's
    ``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``."""
    from torchao.quantization import quantize_

    q = TorchaoInt8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        q.weight = nn.Parameter(lin.weight.detach().to("cpu", torch.float32).clone(), False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().to("cpu", torch.float32).clone(), False)
    quantize_(q, _config(per_channel), filter_fn=lambda m, _: m is q)
    return q.train(lin.training)


def linear_from_tensors(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> TorchaoInt8Linear:
    """The inverse of :meth:`TorchaoInt8Linear.plain_tensors` (used at load): the same
    ``Int8Tensor`` as the layer that was saved, with its codes, scales and zero points."""
    if weight.dtype != torch.int8:
        raise TypeError(f"int8 codes expected, got {weight.dtype}")
    out_features, in_features = weight.shape
    per_channel = weight_scale.numel() > 1 or out_features == 1
    # A layer of the right shape quantized the same way gives the Int8Tensor's settings
    # (block size, activation quantization); its codes and scales are then replaced.
    q = quantize_linear(nn.Linear(in_features, out_features, bias=bias is not None), per_channel)
    template = q.weight
    if weight_scale.shape != template.scale.shape:
        raise ValueError(f"weight_scale: expected shape {tuple(template.scale.shape)}")
    rebuilt = type(template)(
        weight.contiguous(),
        weight_scale.to(template.scale.dtype).contiguous(),
        template.block_size,
        template.dtype,
        zero_point=weight_zero_point.to(torch.int8).contiguous(),
        act_quant_kwargs=template.act_quant_kwargs,
        reduce_range=template.reduce_range,
    )
    q.weight = nn.Parameter(rebuilt, requires_grad=False)
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
    return q.eval()
