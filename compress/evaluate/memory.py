"""Memory, measured not estimated: weight bytes as stored, saved size, peak resident memory.

``module_weight_bytes`` counts the bytes of every tensor in the model's state dict (quantized
weights, their scales/absmax/quantization maps, biases, norms, embeddings), each shared tensor
once. torch's dynamically quantized Linear keeps its weights in an opaque packed object; it is
counted as the plain tensors it unpacks to (``packed_linear_tensors``), exactly what a saved
variant stores. Layers that pack their own weights for a kernel
(``compress.compressors.packed``) describe themselves: ``plain_tensors()`` (their portable form,
byte for byte what the kernel holds), ``weight_numel`` and ``zero_weights()``. ``peak_rss`` runs
an inference pass in a fresh child process that loads the saved variant, so the number is not
polluted by training or by other variants held in this process (the child reads its own
high-water mark, VmHWM, which unlike ru_maxrss does not inherit the parent's). On a CUDA
device the child runs the model there and also reports the GPU's peak allocated bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn


def _storage_key(t: torch.Tensor) -> tuple[int, int, int]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tied weight that appears under two names counts once)."""
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for t in tensors.values():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def is_packed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a torch dynamically quantized Linear (weights in packed params).

    Statically quantized layers are not: their output scale and zero point matter, and their
    state dict raises in ``stored_tensors`` rather than being counted wrong.
    """
    packed = getattr(module, "_packed_params", None)
    return isinstance(getattr(packed, "_packed_params", None), torch.ScriptObject) and any(
        c.__module__.startswith("torch.ao.nn.quantized.dynamic") for c in type(module).__mro__
    )


def packed_linear_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a packed (dynamically quantized) Linear as plain tensors.

    int8: ``weight`` (int8 codes, (out, in)), ``weight_scale`` (fp32) and ``weight_zero_point``
    (int32), of shape (out,) per output channel or () per tensor: the dtypes fbgemm keeps them
    in; then ``bias`` (fp32, (out,)) if any. float16 packing: ``weight`` as fp16 and ``bias``.
    """
    weight, bias = module._packed_params._weight_bias()
    if weight.is_quantized:
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            if weight.q_per_channel_axis() != 0:
                raise ValueError(f"per-channel axis {weight.q_per_channel_axis()}, expected 0")
            scale = weight.q_per_channel_scales().to(torch.float32)
            zero_point = weight.q_per_channel_zero_points().to(torch.int32)
        else:
            scale = torch.tensor(weight.q_scale(), dtype=torch.float32)
            zero_point = torch.tensor(weight.q_zero_point(), dtype=torch.int32)
        out = {"weight": weight.int_repr(), "weight_scale": scale, "weight_zero_point": zero_point}
    else:
        out = {"weight": weight.detach().to(torch.float16)}
    if bias is not None:
        out["bias"] = bias.detach()
    return out


def packs_own_weights(module: nn.Module) -> bool:
    """Whether ``module`` holds its weights in a kernel's layout and gives their portable form
    through ``plain_tensors()`` (``compress.compressors.packed.PackedLinear``)."""
    return callable(getattr(type(module), "plain_tensors", None))


class SavesPlainTensors:
    """Mixin for a Linear that holds its weights in a kernel's layout: its state dict is the
    portable tensors ``plain_tensors()`` names (what is saved and counted), and
    ``weight_numel`` is the weight matrix's size, whatever the layout stores."""

    def plain_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        # Never the module's own parameters: a kernel layout's state dict would not reload
        # (bitsandbytes re-quantizes its packed absmax; torchao's Int8Tensor cannot be
        # detached under inference mode).
        for k, v in self.plain_tensors().items():
            destination[prefix + k] = v if keep_vars else v.detach()

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features


def plain_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a packed layer (torch dynamic int8 or self-packing) as plain tensors."""
    return module.plain_tensors() if packs_own_weights(module) else packed_linear_tensors(module)


def stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as plain tensors: its state dict, with each packed layer replaced
    by its plain tensors (under the same prefix). What is counted and what is saved."""
    packed = {
        name: m for name, m in module.named_modules() if is_packed_linear(m) or packs_own_weights(m)
    }
    prefixes = {name: f"{name}." if name else "" for name in packed}
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in module.state_dict().items():
        owner = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if owner is not None:
            if owner not in done:
                done.add(owner)
                tensors = plain_tensors(packed[owner])
                out.update({prefixes[owner] + k: t for k, t in tensors.items()})
        elif isinstance(value, torch.Tensor):
            out[key] = value
        else:
            raise TypeError(f"cannot count the bytes of {key!r}: a {type(value).__name__}")
    return out


def module_weight_bytes(module: nn.Module) -> int:
    """Exact bytes of a module's weights as stored (its state dict, shared tensors once)."""
    return tensor_bytes(stored_tensors(module))


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter represents (a packed 4-bit tensor holds two per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def param_count(model: nn.Module) -> int:
    """Parameters the model represents, tied ones once, packed ones at their logical size
    (a dynamically quantized Linear holds no ``nn.Parameter``: its weight and bias count; a
    self-packing layer's weight buffers count at ``weight_numel``)."""
    # A self-packing layer whose weight is a parameter (torchao's Int8Tensor, bitsandbytes'
    # CPU-packed 4-bit) counts it once, at ``weight_numel``.
    seen = {
        id(m.weight)
        for m in model.modules()
        if packs_own_weights(m) and isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += logical_numel(p)
    for m in model.modules():
        if packs_own_weights(m):
            total += m.weight_numel
        elif is_packed_linear(m):
            tensors = packed_linear_tensors(m)
            total += sum(tensors[k].numel() for k in ("weight", "bias") if k in tensors)
    return total


def count_zeros(model: nn.Module) -> tuple[int, int]:
    """(zero-valued, total) entries of the linear layers' weight matrices.

    Float weights and int8 codes (a pruned zero stays a zero code) are counted, and the codes
    of self-packing layers that dequantize to exactly 0; embeddings and weights tied to them
    are not, nor bitsandbytes' packed 4-bit codes, which hold two weights per byte.
    """
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    zeros = total = 0
    for m in model.modules():
        if packs_own_weights(m):
            zeros, total = zeros + m.zero_weights(), total + m.weight_numel
            continue
        packed = is_packed_linear(m)  # its int8 codes hold the zeros
        w = packed_linear_tensors(m)["weight"] if packed else getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in skip or w.dim() != 2:
            continue
        if not (w.is_floating_point() or w.dtype == torch.int8) or isinstance(m, nn.LayerNorm):
            continue
        skip.add(id(w))
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros, total


def dir_bytes(path: Path) -> int:
    """Size on disk of a saved variant (all files under ``path``)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def peak_rss(
    variant_dir: Path,
    batch_size: int,
    seq_len: int,
    threads: int,
    timeout: float = 600,
    device: str = "cpu",
) -> dict:
    """Load the saved variant in a fresh Python process, run one forward pass on ``device``,
    report its memory.

    Returns ``{"rss_after_import_bytes", "rss_after_load_bytes", "peak_rss_bytes"}``: the
    resident set after importing torch and compress, after loading the weights, and the peak
    over the whole child process, all in bytes; on a CUDA device also ``"gpu_peak_bytes"``,
    the GPU memory allocated at the peak of loading and the forward pass.
    """
    cmd = [
        sys.executable,
        "-m",
        "compress.evaluate.rss_child",
        str(variant_dir),
        str(batch_size),
        str(seq_len),
        str(threads),
        str(device),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"peak-memory child process failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
