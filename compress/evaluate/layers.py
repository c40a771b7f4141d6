"""Per-layer sparsity and bits per weight of a model's linear layers, as stored.

One record per linear layer (float ``nn.Linear``, torch dynamic int8, bitsandbytes int8/4-bit,
self-packing layers), in model order. A weight tied to the embedding is the embedding's and
is left out, as :func:`compress.evaluate.memory.count_zeros` does.

``bits_per_weight`` is 8 x the layer's stored bytes without its bias (codes, scales, zero
points, quantization maps) / the weights it represents: what a weight costs to keep, so a
4-bit layer with group scales reads a little above 4. ``sparsity`` is the fraction of weights
that are exactly zero, None where the codes hold two weights per byte (bitsandbytes 4-bit).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from compress.evaluate.memory import (
    is_packed_linear,
    logical_numel,
    packs_own_weights,
    plain_tensors,
    stored_tensors,
    tensor_bytes,
)


def _record(name: str, tensors: dict[str, torch.Tensor], numel: int, zeros: int | None) -> dict:
    weight_bytes = tensor_bytes({k: t for k, t in tensors.items() if k != "bias"})
    return {
        "module": name,
        "weights": numel,
        "zeros": zeros,
        "sparsity": None if zeros is None or not numel else zeros / numel,
        "weight_bytes": weight_bytes,
        "bits_per_weight": 8 * weight_bytes / numel if numel else None,
    }


def layer_stats(model: nn.Module) -> list[dict]:
    """``{"module", "weights", "zeros", "sparsity", "weight_bytes", "bits_per_weight"}`` for
    every linear layer of ``model``, in model order."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: list[dict] = []
    for name, m in model.named_modules():
        if packs_own_weights(m):
            out.append(_record(name, plain_tensors(m), m.weight_numel, m.zero_weights()))
        elif is_packed_linear(m):
            tensors = plain_tensors(m)
            w = tensors["weight"]
            out.append(_record(name, tensors, w.numel(), int((w == 0).sum())))
        elif isinstance(m, nn.Linear):
            w = m.weight
            if id(w) in tied:
                continue
            countable = w.dim() == 2 and (w.is_floating_point() or w.dtype == torch.int8)
            zeros = int((w == 0).sum()) if countable else None
            out.append(_record(name, stored_tensors(m), logical_numel(w), zeros))
    return out
