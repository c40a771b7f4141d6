"""Memory, measured not estimated: weight bytes as stored, saved size, peak resident memory.

``module_weight_bytes`` counts the bytes of every tensor in the model's state dict (quantized
weights, their scales/absmax/quantization maps, biases, norms, embeddings), each shared tensor
once. ``peak_rss`` runs an inference pass in a fresh child process that loads the saved variant,
so the number is not polluted by training or by other variants held in this process (the child
reads its own high-water mark, VmHWM, which unlike ru_maxrss does not inherit the parent's).
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


def module_weight_bytes(module: nn.Module) -> int:
    """Exact bytes of a module's weights as stored (its state dict, shared tensors once)."""
    return tensor_bytes(module.state_dict())


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter represents (a packed 4-bit tensor holds two per byte)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def param_count(model: nn.Module) -> int:
    """Parameters the model represents, tied ones once, packed ones at their logical size."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += logical_numel(p)
    return total


def count_zeros(model: nn.Module) -> tuple[int, int]:
    """(zero-valued, total) entries over the floating-point weight matrices (dim >= 2)."""
    zeros = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or p.dim() < 2 or not p.is_floating_point():
            continue
        seen.add(id(p))
        zeros += int((p == 0).sum())
        total += p.numel()
    return zeros, total


def dir_bytes(path: Path) -> int:
    """Size on disk of a saved variant (all files under ``path``)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def peak_rss(
    variant_dir: Path, batch_size: int, seq_len: int, threads: int, timeout: float = 600
) -> dict:
    """Load the saved variant in a fresh Python process, run one forward pass, report RSS.

    Returns ``{"rss_after_import_bytes", "rss_after_load_bytes", "peak_rss_bytes"}``: the
    resident set after importing torch and compress, after loading the weights, and the peak
    over the whole child process, all in bytes.
    """
    cmd = [
        sys.executable,
        "-m",
        "compress.evaluate.rss_child",
        str(variant_dir),
        str(batch_size),
        str(seq_len),
        str(threads),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"peak-RSS child process failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
