"""bitsandbytes 4-bit layers kept in the layout of its AVX512-BF16 CPU kernel, saved that way.

On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weights at the first forward
pass in eval mode into a layout its fused bf16 kernel reads (codes regrouped in blocks of 32
output rows; absmax dequantized from double quantization and rounded to bfloat16, transposed),
and ``state_dict()`` converts them back, re-running double quantization on the rounded absmax
with a new offset. Every save therefore changes the weights a little, and outputs drift.

:class:`CpuPacked4bitLinear` is a ``Linear4bit`` packed once, when it is made, and kept packed:
its state dict and its stored form (:meth:`~CpuPacked4bitLinear.plain_tensors`, what a saved
variant holds and ``compress.evaluate.memory`` counts) are the kernel's own tensors:

- ``weight``: uint8 ``(out, in / 2)``, the kernel's layout (a fixed permutation of nibbles);
- ``weight.absmax``: bfloat16 ``(in / blocksize, out)``, one scale per block of weights;
- ``weight.quant_map``: float32 ``(16,)``, the nf4/fp4 code book;
- ``bias`` (float32) if any.

Loading puts the same tensors back (:func:`from_tensors`), so a reloaded layer computes
bit-identical outputs. Where the loading CPU has no AVX512-BF16, the tensors are unpermuted into
bitsandbytes' plain layout (:func:`unpacked_linear`, lossless: the absmax stays the bf16 values,
held as float32) and run on its portable kernel.

The kernel computes in bfloat16 whatever ``compute_dtype`` says (activations are rounded to
bf16 and back). The double-quantized absmax of ``double_quant: true`` is not kept: the kernel
holds bf16 absmax, 16 bits per block, and that is what is counted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from compress._bnb import import_bnb
from compress.evaluate.memory import SavesPlainTensors

bnb = import_bnb()
from bitsandbytes.functional import (  # noqa: E402  (after import_bnb quiets its logging)
    QuantState,
    _convert_weight_packed_for_cpu,
    has_avx512bf16,
)

BLOCK_N = 32  # output rows per block of the packed layout
LAYOUT = "avx512bf16"  # the manifest's name for this layout


def kernel_available() -> bool:
    """Whether this CPU runs bitsandbytes' packed bf16 4-bit kernel."""
    return bool(has_avx512bf16())


def shape_problem(out_features: int, in_features: int, blocksize: int) -> str:
    """Why the packed kernel cannot take a layer of this shape ('' when it can)."""
    if out_features % BLOCK_N:
        return f"out_features {out_features} is not a multiple of {BLOCK_N}"
    if in_features % blocksize:
        return f"in_features {in_features} is not a multiple of blocksize {blocksize}"
    return ""


class CpuPacked4bitLinear(SavesPlainTensors, bnb.nn.Linear4bit):
    """A ``Linear4bit`` whose weights stay in the packed CPU layout (see the module docstring).
    Build one with :func:`pack` (from a quantized ``Linear4bit``) or :func:`from_tensors`."""

    def _get_name(self) -> str:
        return "Linear4bitCpuPacked"

    def plain_tensors(self) -> dict[str, torch.Tensor]:
        qs = self.weight.quant_state
        out = {
            "weight": self.weight.data,
            "weight.absmax": qs.absmax,
            "weight.quant_map": qs.code,
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def codes(self) -> torch.Tensor:
        """The 4-bit code of every weight, uint8 ``(out, in)``, in the plain row-major order."""
        return unpermute(self.weight.data, self.out_features, self.in_features)

    def zero_weights(self) -> int:
        """Weights that dequantize to exactly 0 (a zero code, or a block whose absmax is 0)."""
        qs = self.weight.quant_state
        zero_code = qs.code[self.codes().long()] == 0  # (out, in)
        absmax = qs.absmax.t().repeat_interleave(qs.blocksize, dim=1)  # (out, in)
        return int((zero_code | (absmax == 0)).sum())


def unpermute(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The kernel's uint8 layout ``(out, in / 2)`` -> codes uint8 ``(out, in)`` (the inverse
    of the permutation ``_convert_weight_packed_for_cpu`` applies)."""
    rows = packed.reshape(-1, BLOCK_N)
    qw = torch.cat([rows & 0xF, rows >> 4], dim=-1)  # (-1, 2 * BLOCK_N): low nibbles, then high
    qw = qw.reshape(out_features // BLOCK_N, in_features // 2, BLOCK_N, 2)
    return qw.transpose(1, 2).reshape(out_features, in_features).contiguous()


def pack(q: nn.Module) -> CpuPacked4bitLinear:
    """A quantized (CPU) ``Linear4bit`` packed for the kernel, in place; returns it."""
    data, state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    q.weight.data, q.weight.quant_state = data, state
    # Nothing here undoes the packing: no original double quantization to restore.
    state.original_nested = False
    q.__class__ = CpuPacked4bitLinear
    q.support_avx512bf16_for_cpu = True
    return q


def _shell(
    in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, quant_type: str
) -> nn.Module:
    return bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type=quant_type,
        device="meta",
    )


def _with_weights(
    data: torch.Tensor, state: QuantState, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> nn.Module:
    """A ``Linear4bit`` of ``state``'s shape holding ``data`` (4-bit codes in either layout)
    as its quantized weight, and ``bias`` in fp32."""
    out_features, in_features = state.shape
    q = _shell(in_features, out_features, bias is not None, compute_dtype, state.quant_type)
    q.weight = bnb.nn.Params4bit(
        data,
        requires_grad=False,
        quant_state=state,
        blocksize=state.blocksize,
        compress_statistics=False,
        quant_type=state.quant_type,
        module=q,
        bnb_quantized=True,
    )
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
    return q


def from_tensors(
    tensors: dict[str, torch.Tensor], quant_type: str, blocksize: int, compute_dtype: torch.dtype
) -> nn.Module:
    """The layer whose :meth:`CpuPacked4bitLinear.plain_tensors` are ``tensors``: packed when
    this CPU has the kernel, else the same weights in bitsandbytes' plain layout."""
    packed, absmax, code = tensors["weight"], tensors["weight.absmax"], tensors["weight.quant_map"]
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    bias = tensors.get("bias")
    if not kernel_available():
        return unpacked_linear(tensors, quant_type, blocksize, compute_dtype)
    state = QuantState(
        absmax=absmax.to(torch.bfloat16),
        shape=torch.Size((out_features, in_features)),
        code=code.to(torch.float32),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=torch.bfloat16,
    )
    state.packing_format_for_cpu = True
    state.original_dtype = torch.float32
    state.original_nested = False
    state.original_qshape = torch.Size((out_features * in_features // 2, 1))
    q = _with_weights(packed.to(torch.uint8).contiguous(), state, bias, compute_dtype)
    q.__class__ = CpuPacked4bitLinear
    q.support_avx512bf16_for_cpu = True
    return q


def unpacked_linear(
    tensors: dict[str, torch.Tensor], quant_type: str, blocksize: int, compute_dtype: torch.dtype
) -> nn.Module:
    """A plain ``Linear4bit`` with the weights of packed ``tensors`` (for a CPU without the
    kernel): codes unpermuted, absmax held as float32 (the same bf16 values)."""
    packed, absmax, code = tensors["weight"], tensors["weight.absmax"], tensors["weight.quant_map"]
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    codes = unpermute(packed, out_features, in_features).reshape(-1)
    plain = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)  # high nibble first
    state = QuantState(
        absmax=absmax.t().reshape(-1).to(torch.float32).contiguous(),
        shape=torch.Size((out_features, in_features)),
        code=code.to(torch.float32),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=torch.float32,
    )
    q = _with_weights(plain, state, tensors.get("bias"), compute_dtype)
    q.support_avx512bf16_for_cpu = False  # plain layout, portable kernel
    return q
