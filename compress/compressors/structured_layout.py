"""Structured pruning driven by a model's layout: whole attention heads and MLP channels of any
family whose adapter describes its blocks (:class:`~compress.models.adapter.BlockLayout`).

torch-pruning's dependency graph is not used here: on Hugging Face models its trace of one
forward pass did not finish (transformers' mask and attention plumbing), and it fails on a fused
``q|k|v`` projection (GPT-2's ``c_attn``, see DESIGN.md). The layout already says which rows and
columns belong together, so this module builds the coupled groups itself, scores them the way
torch-pruning's importances do, and removes the losers with torch-pruning's own layer pruners
(``prune_linear_out_channels`` / ``prune_linear_in_channels``), rows and biases together.

Groups, per block (every block keeps the same widths, so one config describes the model):

- attention, grouped-query (``n_kv_heads > 1``, plain multi-head attention included): one key/
  value head with the ``n_heads / n_kv_heads`` query heads that read it: their q rows, the k and
  v rows, the output projection's input columns. Whole groups go, so ``n_heads % n_kv_heads``
  holds and every query head keeps its own key/value head. With one key/value head (multi-query)
  query heads are pruned one by one and the key/value head stays. Head width never changes
  (rotary embeddings need it).
- MLP: one hidden channel: its row of ``up`` (and of ``gate`` in a SwiGLU MLP) and its column
  of ``down``.

Scores (per group: each coupled layer's per-channel scores summed over the group's channels,
then averaged over the layers, torch-pruning's ``group_reduction="mean"``): ``magnitude`` the
squared L2 norm of the row or column a channel owns; ``taylor`` the sum of ``|w * grad|`` over
it (gradients of next-token cross-entropy); ``lamp`` magnitude, LAMP-normalised over the
block's groups (within one block it ranks like magnitude); ``random`` seeded uniform scores.
The highest scores are kept; ties go to the lower index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from compress.models.adapter import BlockLayout, ModelLayout


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class HeadPlan:
    """Heads kept per block: ``kv`` key/value heads and ``q`` query heads; ``unit`` is what one
    pruning group holds (``"kv-group"`` or ``"query-head"``)."""

    q: int
    kv: int
    unit: str


def plan_heads(block: BlockLayout, ratio: float) -> HeadPlan:
    """How many heads ``ratio`` leaves, keeping grouped-query attention consistent."""
    h, kv = block.n_heads, block.n_kv_heads
    if kv > 1:
        kept_kv = min(kv, max(1, round_half_up(kv * (1 - ratio))))
        return HeadPlan(q=kept_kv * (h // kv), kv=kept_kv, unit="kv-group")
    return HeadPlan(q=min(h, max(1, round_half_up(h * (1 - ratio)))), kv=1, unit="query-head")


@dataclass
class Side:
    """One coupled layer of a group: its rows (``dim`` 0) or columns (``dim`` 1) ``index[g]``
    belong to group ``g``."""

    layer: nn.Linear
    dim: int
    index: list[list[int]]


def _rows(start: int, heads: list[int], hd: int) -> list[list[int]]:
    return [list(range(start + h * hd, start + (h + 1) * hd)) for h in heads]


def attention_groups(model: nn.Module, block: BlockLayout, unit: str) -> list[Side]:
    """The coupled rows/columns of every attention group of ``block``."""
    h, kv, hd = block.n_heads, block.n_kv_heads, block.head_dim
    per = h // kv
    if unit == "kv-group":
        q_heads = [list(range(g * per, (g + 1) * per)) for g in range(kv)]
        kv_heads = [[g] for g in range(kv)]
    else:
        q_heads = [[i] for i in range(h)]
        kv_heads = None  # the one key/value head is shared by all: not part of any group

    def rows(start: int, heads: list[list[int]]) -> list[list[int]]:
        return [sum(_rows(start, hs, hd), []) for hs in heads]

    sides = []
    o = model.get_submodule(block.o)
    if block.qkv:
        fused = model.get_submodule(block.qkv)
        q_rows = rows(0, q_heads)
        if kv_heads is not None:
            k_rows, v_rows = rows(h * hd, kv_heads), rows((h + kv) * hd, kv_heads)
            q_rows = [a + b + c for a, b, c in zip(q_rows, k_rows, v_rows)]
        sides.append(Side(fused, 0, q_rows))
    else:
        sides.append(Side(model.get_submodule(block.q), 0, rows(0, q_heads)))
        if kv_heads is not None:
            for name in (block.k, block.v):
                sides.append(Side(model.get_submodule(name), 0, rows(0, kv_heads)))
    sides.append(Side(o, 1, rows(0, q_heads)))
    return sides


def mlp_groups(model: nn.Module, block: BlockLayout) -> list[Side]:
    channels = [[i] for i in range(block.mlp_hidden)]
    sides = [Side(model.get_submodule(n), 0, channels) for n in block.mlp_inputs]
    sides.append(Side(model.get_submodule(block.mlp_down), 1, channels))
    return sides


def group_scores(sides: list[Side], importance: str, generator: torch.Generator) -> torch.Tensor:
    """One score per group (see the module docstring)."""
    n = len(sides[0].index)
    if importance == "random":
        return torch.rand(n, generator=generator)
    total = torch.zeros(n, dtype=torch.float64)
    for side in sides:
        w = side.layer.weight.detach()
        if importance == "taylor":
            if side.layer.weight.grad is None:
                raise ValueError(f"no gradient on {side.layer}")
            per = (w * side.layer.weight.grad).abs()
        else:
            per = w.pow(2)
        per = per.sum(dim=1 - side.dim).double()  # one value per row (dim 0) or column (dim 1)
        total += torch.stack([per[idx].sum() for idx in side.index])
    scores = total / len(sides)
    if importance == "lamp":
        order = torch.argsort(scores)  # ascending: each score over the sum of those not smaller
        tail = torch.flip(torch.cumsum(torch.flip(scores[order], [0]), 0), [0])
        lamp = torch.empty_like(scores)
        lamp[order] = scores[order] / tail.clamp(min=torch.finfo(torch.float64).tiny)
        scores = lamp
    return scores.float()


def keep_best(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring groups, ties to the lower index, in index order."""
    order = torch.argsort(-scores, stable=True)
    return sorted(order[:k].tolist())


def prune_groups(sides: list[Side], keep: list[int]) -> None:
    """Remove every group not in ``keep`` from each coupled layer (torch-pruning's pruners)."""
    import torch_pruning as tp

    gone = sorted(set(range(len(sides[0].index))) - set(keep))
    for side in sides:
        idxs = sorted(i for g in gone for i in side.index[g])
        if side.dim == 0:
            tp.prune_linear_out_channels(side.layer, idxs)
        else:
            tp.prune_linear_in_channels(side.layer, idxs)


def check_layers(model: nn.Module, layout: ModelLayout) -> None:
    """Every layer the stage cuts must be a plain ``nn.Linear`` without masks or hooks."""
    from compress.errors import CompressError

    for block in layout.blocks:
        for name in block.linears:
            layer = model.get_submodule(name)
            if type(layer) is not nn.Linear:
                raise CompressError(
                    f"structured: {name} is a {type(layer).__name__}, not nn.Linear; "
                    "run structured pruning before quantization"
                )
            if nn.utils.parametrize.is_parametrized(layer) or layer._forward_pre_hooks:
                raise CompressError(
                    f"structured: {name} carries a parametrization or hook (e.g. a pruning "
                    "mask); make it permanent before structured pruning"
                )


def prune_by_layout(
    model: nn.Module,
    layout: ModelLayout,
    heads: HeadPlan | None,
    mlp: int | None,
    importance: str,
    seed: int,
) -> None:
    """Prune every block of ``model`` in place to ``heads`` and ``mlp`` channels (None: keep)."""
    gen = torch.Generator().manual_seed(seed)
    for block in layout.blocks:
        if heads is not None:
            sides = attention_groups(model, block, heads.unit)
            kept = heads.kv if heads.unit == "kv-group" else heads.q
            prune_groups(sides, keep_best(group_scores(sides, importance, gen), kept))
        if mlp is not None:
            sides = mlp_groups(model, block)
            prune_groups(sides, keep_best(group_scores(sides, importance, gen), mlp))
