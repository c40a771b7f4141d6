"""Dynamic int8 for fast CPU inference: ``dynamic-int8``.

int8 weights and int8 activations quantized at run time, one int8 GEMM with int32 accumulation.
Two backends compute it; ``backend: auto`` (the default) takes the first that is installed:

- ``torchao``: torchao's ``Int8DynamicActivationInt8WeightConfig`` through ``quantize_``
  (:mod:`compress.compressors.int8_torchao`): symmetric int8 weights with one scale per output
  row, activations quantized per token. With ``compile: true`` (the default) the whole model is
  compiled with ``torch.compile`` (:mod:`compress.compile`), which fuses the activation
  quantization with its neighbours; eager, torchao is slower than the fallback below. Whether
  compiled torchao or the fallback is faster depends on the machine and how busy it is
  (compiled kernels suffered most when the cores were oversubscribed): measure with
  ``benchmarks/cpu_paths.py``, and pick ``backend: torch.ao`` where it wins.
- ``torch.ao`` (the fallback where torchao is missing): each targeted ``nn.Linear`` becomes a
  ``DynamicInt8Linear``, torch's dynamically quantized Linear
  (``torch.ao.nn.quantized.dynamic.Linear``, fbgemm kernels under the ``x86``/``fbgemm``
  quantized engine) under a clearer name. Weights: int8 codes in [-127, 127] with one symmetric
  fp32 scale per output channel (zero point 0), or one for the whole matrix with
  ``per_channel: false``; prepacked once. Activations: quantized on every call to uint8 with
  one scale and zero point from the min/max of that call's whole input, over a 7-bit range so
  AVX2's int16 pair sums cannot saturate. torch 2.13 deprecates this API (and warns once per
  process when a quantized tensor is created; the warning is filtered by its message, only
  around that creation).

The report's ``extra["backend"]`` says which backend ran (and whether the model is compiled).

How the torch.ao layers are stored and counted (see
``compress.evaluate.memory.packed_linear_tensors``): int8 codes (1 byte per weight), fp32 scale
and int32 zero point per output channel (as the kernel holds them), fp32 bias. fbgemm also
caches one int32 column sum per output channel, derived from the codes when a layer is packed;
it is rebuilt on load, not stored, not counted. The torchao layers: see
:mod:`compress.compressors.int8_torchao`.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Literal

import torch
import torch.ao.nn.quantized.dynamic as nnqd  # already imported by ``import torch``
import torch.nn as nn

from compress.compile import compile_model
from compress.compressors import int8_torchao
from compress.compressors.base import StageConfig, StageContext, StageReport, register
from compress.compressors.quantize import convert_linears
from compress.compressors.targets import select_modules
from compress.errors import CompressError
from compress.models.adapter import adapter_for, model_device

log = logging.getLogger(__name__)

KIND = "dynamic-int8"
QMAX = 127  # symmetric: codes in [-QMAX, QMAX]
TORCHAO, TORCH_AO = "torchao", "torch.ao"


class DynamicInt8Config(StageConfig):
    per_channel: bool = True  # one scale per output channel (else one per matrix)
    # Also quantize the LM head, the largest single GEMM. When it is tied to the token embedding
    # an int8 copy is made and the fp32 embedding stays for lookups: faster, a little larger.
    lm_head: bool = False
    targets: list[str] | None = None
    ignore: list[str] = ["lm_head"]
    # auto: torchao where it is installed, else torch.ao (see the module docstring)
    backend: Literal["auto", "torchao", "torch.ao"] = "auto"
    # torchao only: compile the whole model with torch.compile (at its first call)
    compile: bool = True


class DynamicInt8Linear(nnqd.Linear):
    """torch's dynamically quantized Linear (qint8 weights, fbgemm kernels), unchanged; named
    for what it is, so reports and module listings do not show a bare ``Linear``."""

    def _get_name(self) -> str:
        return "DynamicInt8Linear"


def engine() -> str:
    """The quantized engine layers are packed with: fbgemm's (``x86``/``fbgemm``) where built.

    Pinned rather than taken from ``torch.backends.quantized.engine``: ``onednn`` packing keeps
    a second, unpacked copy of every weight in memory (measured: 2x the int8 bytes), which
    would make the counted bytes untrue.
    """
    supported = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in supported), torch.backends.quantized.engine)


def backend() -> str:
    """The fallback backend, described."""
    return f"torch.ao dynamic quantized Linear ({engine()} engine)"


def resolve_backend(requested: str) -> str:
    """``torchao`` or ``torch.ao``: the backend that will run for ``requested``."""
    if requested == TORCH_AO:
        return TORCH_AO
    if int8_torchao.import_torchao() is not None:
        return TORCHAO
    if requested == TORCHAO:
        raise CompressError(
            f"{KIND}.backend: torchao is not installed (pip install torchao); "
            "allowed without it: auto, torch.ao"
        )
    log.info("%s: torchao is not installed; using the torch.ao fallback", KIND)
    return TORCH_AO


@contextmanager
def _packing():
    """Pack with ``engine()``, silencing torch's deprecation warning for creating qint8
    tensors (see the module docstring); the global engine setting is restored after."""
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        torch.backends.quantized.engine = engine()
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def quantize_weight(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, ...]:
    """Symmetric int8 codes (out, in), fp32 scales and int32 zero points (all 0), the latter
    two of shape (out,) per channel or () per tensor."""
    w = weight.detach().to("cpu", torch.float32)
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().amax()  # (out,) or ()
    # An all-zero row (e.g. pruned) gets a tiny scale and all-zero codes.
    scale = (absmax / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale.reshape(-1, 1)).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale, torch.zeros_like(scale, dtype=torch.int32)


def linear_from_tensors(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> DynamicInt8Linear:
    """A dynamically quantized Linear from plain tensors (the inverse of
    ``packed_linear_tensors``): int8 codes (out, in), fp32 scales and int32 zero points of
    shape (out,) per channel or () per tensor, optional fp32 bias (out,).

    Conversion and loading both go through here, so a reloaded layer packs the very same
    weights and computes bit-identical outputs.
    """
    out_features, in_features = weight.shape
    if weight.dtype != torch.int8:
        raise TypeError(f"int8 codes expected, got {weight.dtype}")
    with _packing():
        if weight_scale.dim() == 0:
            qweight = torch._make_per_tensor_quantized_tensor(
                weight, float(weight_scale.item()), int(weight_zero_point.item())
            )
        else:
            qweight = torch._make_per_channel_quantized_tensor(
                weight, weight_scale.double(), weight_zero_point.long(), 0
            )
        layer = DynamicInt8Linear(in_features, out_features, bias_=bias is not None)
        layer.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return layer


def make_dynamic_int8_linear(lin: nn.Linear, per_channel: bool) -> DynamicInt8Linear:
    codes, scale, zero_point = quantize_weight(lin.weight, per_channel)
    bias = None if lin.bias is None else lin.bias.detach().to("cpu", torch.float32).clone()
    return linear_from_tensors(codes, scale, zero_point, bias)


@register(KIND, DynamicInt8Config)
def apply_dynamic_int8(
    model: nn.Module, cfg: DynamicInt8Config, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Dynamic int8 (torch/fbgemm): int8 weights and activations, int8 GEMM; fast on a CPU."""
    if model_device(model).type != "cpu":
        raise CompressError(
            f"{KIND}: torch's dynamic int8 kernels (fbgemm) run on the CPU only; on "
            f"{model_device(model)} use int8, nf4 or fp4"
        )
    ignore = cfg.ignore
    untied = False
    if cfg.lm_head:
        name = adapter_for(model).lm_head(model)
        head = model.get_submodule(name) if name else None
        if not isinstance(head, nn.Linear):
            raise CompressError(f"{KIND}.lm_head: the model has no nn.Linear LM head")
        if any(head.weight is getattr(m, "weight", None) for m in model.modules() if m is not head):
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            untied = True
        ignore = [s for s in ignore if s not in ("lm_head", name)]
    sel = select_modules(model, (nn.Linear,), cfg.targets, ignore, stage=KIND)
    report = StageReport(stage=KIND, config=cfg.model_dump(), skipped=sel.skipped)
    chosen = resolve_backend(cfg.backend)
    spec = {"kind": KIND, "per_channel": cfg.per_channel, "backend": chosen}
    if chosen == TORCHAO:
        make = lambda lin: int8_torchao.quantize_linear(lin, cfg.per_channel)  # noqa: E731
        described = f"torchao {int8_torchao.version()} Int8DynamicActivationInt8WeightConfig" + (
            " + torch.compile (whole model)" if cfg.compile else " (eager)"
        )
    else:
        make = lambda lin: make_dynamic_int8_linear(lin, cfg.per_channel)  # noqa: E731
        described = backend()
    convert_linears(model, sel.selected, make, spec, report)
    compiled = chosen == TORCHAO and cfg.compile
    if compiled:
        compile_model(model)
    report.extra["backend"] = described
    report.extra["backend_name"] = chosen
    report.extra["compiled"] = compiled
    report.extra["lm_head_untied_copy"] = untied
    return model, report
