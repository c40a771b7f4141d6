"""Packed low-bit weight-only linear layers on torch's CPU kernels: the API quantizers build on.

A :class:`PackedLinear` holds integer weight codes in the layout of one of torch's CPU GEMM
kernels (the kernels torchao's ``Int4WeightOnlyConfig`` CPU path and ``Int8WeightOnlyConfig``
call) and computes ``y = x @ dequant(W).T + bias`` with that kernel, never with a float copy:

- 4 bits: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (two codes per byte, one scale and one
  offset per group of ``group_size`` input columns, group sizes 32/64/128/256, ``out_features``
  a multiple of 16);
- 8 bits: ``torch.ops.aten._weight_int8pack_mm`` (one int8 code per byte, one symmetric scale
  per output row).

Conventions of the plain form (what a quantizer passes in, what is saved, what
:func:`dequantize` reads):

- ``codes``: integer tensor ``(out_features, in_features)``.
  4-bit asymmetric: uint4 values in [0, 15]; ``w = (q - zero) * scale``.
  4-bit symmetric: signed values in [-8, 7]; ``w = q * scale`` (stored as ``q + 8`` with zero 8).
  8-bit (symmetric only): int8 values in [-128, 127]; ``w = q * scale``.
- ``scales``: ``(out_features, n_groups)``, ``n_groups = in_features // group_size`` (1 when
  ``group_size`` is None: one group per output row). Group ``g`` of row ``r`` covers input
  columns ``[g * group_size, (g + 1) * group_size)``. Scales are rounded to ``compute_dtype``
  when the layer is built: quantize against :func:`round_scales` of them to get what the
  kernel computes. They must be positive and finite.
- ``zeros`` (4-bit asymmetric only): integer zero points ``(out_features, n_groups)`` in
  [0, 15]; a weight of exactly 0 is code ``zero``.

Both kernels read activations, scales and outputs in ``compute_dtype``. On x86 only the
bfloat16 kernels are vectorized (AVX2 or AVX512); float32 runs a scalar loop, exact but slow,
and is offered for exact reference checks and for CPUs whose float32 path is vectorized
(aarch64). Layers are built and run on the CPU only: there is no other kernel for this layout.

In memory a layer holds the kernel's own tensors (``qweight``, ``qparams``), whose layout
depends on the CPU's vector width; its plain form (:meth:`PackedLinear.plain_tensors`) has the
same bytes in a portable layout: 4-bit ``codes`` uint8 ``(out, in / 2)`` (column ``2j`` in the
low nibble of byte ``j``, ``2j + 1`` in the high one), ``scales`` and ``zeros`` ``(out,
n_groups)`` in ``compute_dtype`` (the zeros' integer values; 8 for symmetric); 8-bit ``codes``
int8 ``(out, in)`` and ``scales`` ``(out, 1)``; then ``bias`` (in its own dtype) if any. That is
what a saved variant stores and what ``compress.evaluate.memory`` counts; loading repacks it,
which is deterministic, so a reloaded layer computes bit-identical outputs.

A layer may also hold an ``input_scale`` (float32, ``(in_features,)``): its input is multiplied
by it before the kernel, so it computes ``x @ (dequant(W) * input_scale).T`` (AWQ's per-channel
scaling, :mod:`compress.compressors.awq`, kept as one multiply instead of folded into the layer
before). It is saved and counted with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from compress.errors import CompressError

KIND = "packed"
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
SYMMETRIC_ZERO = 8  # a signed 4-bit code q is stored as q + 8


@dataclass(frozen=True)
class PackedSpec:
    """How a layer's weights are quantized: bit width, group size, symmetry, compute dtype."""

    bits: Literal[4, 8] = 4
    group_size: int | None = 128  # None: one group per output row
    symmetric: bool = False
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    def __post_init__(self) -> None:
        problem = spec_problem(self.bits, self.group_size, self.symmetric, self.compute_dtype)
        if problem:
            raise CompressError(problem)

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def check_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        """Raise a one-line :class:`CompressError` when no kernel takes this layer's shape."""
        problem = shape_problem(self, out_features, in_features)
        if problem:
            raise CompressError(f"{name} ({out_features}x{in_features}): {problem}")

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "compute_dtype": self.compute_dtype,
        }


def spec_problem(bits: int, group_size: int | None, symmetric: bool, compute_dtype: str) -> str:
    """Why no packed CPU kernel exists for these settings ('' when one does)."""
    if bits not in (4, 8):
        return f"bits {bits}: packed CPU kernels exist for 4 and 8 bits"
    if compute_dtype not in COMPUTE_DTYPES:
        return f"compute_dtype {compute_dtype!r}: allowed: {', '.join(COMPUTE_DTYPES)}"
    if group_size is not None and group_size not in GROUP_SIZES:
        return (
            f"group_size {group_size}: the int4 kernel takes groups of "
            f"{', '.join(map(str, GROUP_SIZES))} input columns (or null: one per row)"
        )
    if bits == 8 and group_size is not None:
        return (
            "8 bits: the int8 kernel (_weight_int8pack_mm) has one scale per output row; "
            "set group_size: null"
        )
    if bits == 8 and not symmetric:
        return "8 bits: the int8 kernel (_weight_int8pack_mm) is symmetric; set symmetric: true"
    return ""


def shape_problem(spec: PackedSpec, out_features: int, in_features: int) -> str:
    """Why the kernel cannot take a layer of this shape ('' when it can)."""
    if spec.bits == 8:
        return ""
    if out_features % INT4_ROW_MULTIPLE:
        return (
            f"the int4 kernel needs out_features to be a multiple of {INT4_ROW_MULTIPLE}; "
            "leave this layer out (ignore) or use bits: 8"
        )
    group = in_features if spec.group_size is None else spec.group_size
    if spec.group_size is None and group not in GROUP_SIZES:
        return (
            f"group_size null makes one group of {in_features} columns; the int4 kernel takes "
            f"{', '.join(map(str, GROUP_SIZES))}"
        )
    if in_features % group:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"group sizes that divide it: {', '.join(map(str, fits))}" if fits else "none fits"
        return f"in_features is not a multiple of group_size {group} ({hint})"
    return ""


# ---------------------------------------------------------------------------------------------
# The plain <-> kernel layouts


def _kernel_pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint4 values (N, K) -> the int4 kernel's packed uint8 layout (N, K / 2)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a uint8 tensor, flat: the low nibble of each byte, then the high."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten()


def _kernel_unpack4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of :func:`_kernel_pack4`: uint8 values (N, K) in [0, 15].

    The kernel's layout (which depends on the CPU's vector width) is a permutation of nibbles;
    it is read off by packing probes whose values spell out each code's position, 4 bits at a
    time, and checked by packing the result again.
    """
    n = out_features * in_features
    position = torch.arange(n, dtype=torch.int64)
    source = torch.zeros(n, dtype=torch.int64)
    for shift in range(0, max(4, (n - 1).bit_length()), 4):
        probe = ((position >> shift) & 15).view(out_features, in_features)
        source |= _nibbles(_kernel_pack4(probe)).to(torch.int64) << shift
    codes = torch.empty(n, dtype=torch.uint8)
    codes[source] = _nibbles(packed)
    codes = codes.view(out_features, in_features)
    if not torch.equal(_kernel_pack4(codes), packed):
        raise RuntimeError("the int4 kernel's weight layout is not a permutation of nibbles")
    return codes


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint4 values (N, K) -> uint8 (N, K / 2): column 2j in the low nibble, 2j + 1 high."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_pairs`: uint8 values (N, K) in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(1)


def round_scales(scales: torch.Tensor, spec: PackedSpec) -> torch.Tensor:
    """Scales as the kernel will hold them (rounded to ``compute_dtype``), as float32."""
    return scales.detach().to(spec.dtype).to(torch.float32)


def ceil_scales(scales: torch.Tensor, spec: PackedSpec) -> torch.Tensor:
    """The smallest scales held exactly in ``compute_dtype`` that are at least ``scales``
    (float32): a grid built on them still spans the range it was chosen for."""
    held = scales.detach().to(spec.dtype)
    up = torch.nextafter(held, torch.full_like(held, float("inf")))
    return torch.where(held.to(torch.float32) < scales, up, held).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# The layer


class PackedLinear(nn.Module):
    """A weight-only quantized ``nn.Linear`` computed by a packed CPU kernel (see the module
    docstring for the layout). Build one with :func:`pack_linear` or :func:`from_plain`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: PackedSpec,
        qweight: torch.Tensor,
        qparams: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.register_buffer("qweight", qweight)  # the kernel's layout
        self.register_buffer("qparams", qparams)  # 4-bit: (G, N, 2) scale, offset; 8-bit: (N,)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", input_scale)  # (in,) float32, or None

    def _get_name(self) -> str:
        return f"PackedInt{self.spec.bits}Linear"

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, compute={s.compute_dtype}"
            + (", input_scale" if self.input_scale is not None else "")
        )

    @property
    def weight_numel(self) -> int:
        """Weights this layer represents (its logical, unpacked size)."""
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"{self._get_name()} runs on the CPU only, got input on {x.device}")
        shape = x.shape  # (..., in)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        a = x.reshape(-1, self.in_features).to(self.spec.dtype).contiguous()  # (M, in)
        if self.spec.bits == 4:
            group = self.spec.group_size or self.in_features
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.qweight, group, self.qparams)
        else:
            y = torch.ops.aten._weight_int8pack_mm(a, self.qweight, self.qparams)  # (M, out)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)  # (..., out)

    def plain(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes, scales, zeros)`` as :func:`pack_linear` takes them: codes (N, K) int16 in
        the spec's signed or unsigned range, float32 scales (N, G), integer zeros (N, G)
        (None when symmetric)."""
        spec = self.spec
        if spec.bits == 8:
            return self.qweight.to(torch.int16), self.qparams.float().view(-1, 1), None
        u4 = _kernel_unpack4(self.qweight, self.out_features, self.in_features).to(torch.int16)
        scale, offset = (t.squeeze(-1).t().float() for t in self.qparams.split(1, dim=-1))
        if spec.symmetric:
            return u4 - SYMMETRIC_ZERO, scale, None
        # offset = (8 - zero) * scale, rounded to compute_dtype: within scale / 64 of exact.
        zeros = (SYMMETRIC_ZERO - offset / scale).round().to(torch.int16)
        return u4, scale, zeros

    def plain_tensors(self) -> dict[str, torch.Tensor]:
        """The portable form: what a saved variant stores and what is counted (see the module
        docstring); :func:`from_plain` is its inverse."""
        codes, scales, zeros = self.plain()
        dtype = self.spec.dtype
        if self.spec.bits == 8:
            out = {"codes": codes.to(torch.int8), "scales": scales.to(dtype)}
        else:
            if zeros is None:
                codes = codes + SYMMETRIC_ZERO
                zeros = torch.full_like(scales, SYMMETRIC_ZERO)
            out = {
                "codes": pack_pairs(codes),
                "scales": scales.to(dtype),
                "zeros": zeros.to(dtype),
            }
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        if self.input_scale is not None:
            out["input_scale"] = self.input_scale.detach()
        return out

    def zero_weights(self) -> int:
        """Weights that dequantize to exactly 0 (a pruned weight stays a zero code)."""
        codes, _, zeros = self.plain()
        if zeros is None:
            return int((codes == 0).sum())
        group = self.spec.group_size or self.in_features
        return int((codes == zeros.repeat_interleave(group, dim=1)).sum())

    def dequantize(self) -> torch.Tensor:
        """float32 weights (N, K) this layer computes with, the input scale applied (up to
        compute_dtype rounding of activations, outputs and group offsets)."""
        codes, scales, zeros = self.plain()
        w = dequantize(codes, scales, zeros, self.spec)
        return w if self.input_scale is None else w * self.input_scale.float()


def _check_plain(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: PackedSpec
) -> None:
    out_features, in_features = codes.shape
    groups = spec.groups(in_features)
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if scales.shape != (out_features, groups):
        raise ValueError(f"scales: expected shape {(out_features, groups)}, got {scales.shape}")
    lo, hi = spec.qmin, spec.qmax
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}] for this spec")
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise ValueError("scales must be positive and finite")
    if spec.symmetric:
        if zeros is not None:
            raise ValueError("symmetric codes take no zero points")
        return
    if zeros is None or zeros.shape != (out_features, groups):
        raise ValueError(f"zeros: expected shape {(out_features, groups)}")
    if zeros.is_floating_point() and not torch.equal(zeros, zeros.round()):
        raise ValueError("zero points must be integers")
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 15):
        raise ValueError("4-bit zero points must lie in [0, 15]")


def pack_linear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    spec: PackedSpec,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> PackedLinear:
    """A :class:`PackedLinear` from integer codes, per-group scales and zero points (the
    conventions are in the module docstring), packed for the kernel of ``spec.bits``, with
    its input multiplied by ``input_scale`` (``(in_features,)``, positive) when given.

    Raises :class:`CompressError` (one line) when no kernel takes this shape and spec, and
    ``ValueError``/``TypeError`` for tensors that break the conventions.
    """
    codes, scales = codes.detach().cpu(), scales.detach().cpu()
    zeros = None if zeros is None else zeros.detach().cpu()
    out_features, in_features = codes.shape
    spec.check_shape(out_features, in_features)
    _check_plain(codes, scales, zeros, spec)
    dtype = spec.dtype
    scale = scales.to(dtype)
    if spec.bits == 8:
        qweight = codes.to(torch.int8).contiguous()
        qparams = scale.reshape(out_features).contiguous()
    else:
        u4 = codes + SYMMETRIC_ZERO if spec.symmetric else codes
        zero = torch.full_like(scales, SYMMETRIC_ZERO) if zeros is None else zeros
        # The kernel computes w = (u4 - 8) * scale + offset, so offset = (8 - zero) * scale.
        offset = ((SYMMETRIC_ZERO - zero.to(torch.float32)) * scale.to(torch.float32)).to(dtype)
        qweight = _kernel_pack4(u4)
        qparams = torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    if bias is not None:
        bias = bias.detach().to("cpu").clone()
    if input_scale is not None:
        input_scale = input_scale.detach().to("cpu", torch.float32).clone()
        if input_scale.shape != (in_features,):
            raise ValueError(
                f"input_scale: expected shape {(in_features,)}, got {input_scale.shape}"
            )
        if not (torch.isfinite(input_scale).all() and (input_scale > 0).all()):
            raise ValueError("input_scale must be positive and finite")
    return PackedLinear(in_features, out_features, spec, qweight, qparams, bias, input_scale)


def from_plain(tensors: dict[str, torch.Tensor], spec: PackedSpec) -> PackedLinear:
    """The layer whose :meth:`PackedLinear.plain_tensors` are ``tensors`` (used at load)."""
    codes, scales = tensors["codes"], tensors["scales"].to(torch.float32)
    bias, scale_in = tensors.get("bias"), tensors.get("input_scale")
    if spec.bits == 8:
        return pack_linear(codes, scales, None, spec, bias, scale_in)
    u4 = unpack_pairs(codes).to(torch.int16)
    if spec.symmetric:
        return pack_linear(u4 - SYMMETRIC_ZERO, scales, None, spec, bias, scale_in)
    zeros = tensors["zeros"].to(torch.float32).round().to(torch.int16)
    return pack_linear(u4, scales, zeros, spec, bias, scale_in)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: PackedSpec
) -> torch.Tensor:
    """float32 weights (N, K) of the plain form, with scales as the kernel holds them:
    ``(q - zero) * scale`` (asymmetric) or ``q * scale`` (symmetric), per group of columns."""
    group = spec.group_size or codes.shape[1]
    q = codes.to(torch.float32)
    if zeros is not None:
        q = q - zeros.to(torch.float32).repeat_interleave(group, dim=1)
    return q * round_scales(scales, spec).repeat_interleave(group, dim=1)


# ---------------------------------------------------------------------------------------------
# Round to nearest


def choose_qparams(
    weight: torch.Tensor, spec: PackedSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales (N, G) and zero points (N, G) for ``weight`` (N, K): symmetric
    ``scale = absmax / qmax``; asymmetric over ``[min(w, 0), max(w, 0)]`` (so 0 is a code) with
    ``scale = (max - min) / 15`` and ``zero = round(-min / scale)``. Scales are rounded up to
    the next value ``compute_dtype`` holds, so every weight is within half a step of the grid.
    An all-zero group gets scale 1 and its zero point (its codes stay exact zeros)."""
    out_features, in_features = weight.shape
    groups = spec.groups(in_features)
    w = weight.detach().to("cpu", torch.float32).reshape(out_features, groups, -1)  # (N, G, gs)
    if spec.symmetric:
        scale = w.abs().amax(dim=-1) / spec.qmax
        scale = ceil_scales(torch.where(scale > 0, scale, torch.ones_like(scale)), spec)
        return scale, None
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = ceil_scales(torch.where(scale > 0, scale, torch.ones_like(scale)), spec)
    zeros = torch.round(-lo / scale).clamp(0, spec.qmax).to(torch.int16)
    return scale, zeros


def quantize(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: PackedSpec
) -> torch.Tensor:
    """Round-to-nearest int16 codes (N, K) of ``weight`` on the grid of ``scales``/``zeros``."""
    group = spec.group_size or weight.shape[1]
    w = weight.detach().to("cpu", torch.float32)
    q = w / round_scales(scales, spec).repeat_interleave(group, dim=1)
    if zeros is not None:
        q = q + zeros.to(torch.float32).repeat_interleave(group, dim=1)
    return torch.round(q).clamp(spec.qmin, spec.qmax).to(torch.int16)


def quantize_linear(lin: nn.Linear, spec: PackedSpec, name: str = "layer") -> PackedLinear:
    """Round-to-nearest quantization of ``lin`` onto the packed kernel of ``spec``."""
    spec.check_shape(lin.out_features, lin.in_features, name)
    scales, zeros = choose_qparams(lin.weight, spec)
    codes = quantize(lin.weight, scales, zeros, spec)
    return pack_linear(codes, scales, zeros, spec, lin.bias)
