"""Block-by-block calibration: the loop SparseGPT, Wanda and GPTQ share.

The reference implementations compress a transformer one block at a time, so that only one
block's activation statistics are in memory and every block is fitted to the inputs the
already-compressed blocks before it produce:

1. run the model on the calibration windows until the first block, whose inputs (and the
   keyword arguments the model passes its blocks: attention mask, position ids, rotary
   position embeddings) are captured by a hook that then stops the forward pass;
2. for each block: hooks on its linear layers accumulate ``H = sum x x^T`` over every
   calibration token reaching them (:class:`InputStats`), the method rewrites the block's
   weights from those statistics, and the block is run again to give the next block its
   inputs.

Blocks are found through the model's adapter layout (:mod:`compress.models.adapter`), and
called the way the model itself calls them, so the loop is the same for the built-in GPT and
the Hugging Face families.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress.models.adapter import BlockLayout, ModelLayout, model_device

log = logging.getLogger(__name__)


class InputStats:
    """``H = sum x x^T`` (float32) and ``sum |x|`` per column over the input rows ``x`` a
    linear layer has seen."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.H.shape[0]).to(torch.float32)  # (rows, in)
        self.H.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.rows += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x_j|`` per input column ``j`` (AWQ's activation magnitude)."""
        return self.abs_sum / max(self.rows, 1)

    @property
    def sq_norms(self) -> torch.Tensor:
        """``||X_j||_2^2`` per input column ``j`` (the diagonal of ``H``)."""
        return torch.diagonal(self.H)


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, H: torch.Tensor) -> float:
    """``||W X - W' X||_F^2 / ||W X||_F^2`` over the calibration inputs ``X`` summed in ``H``
    (``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W'``; biases cancel in the numerator and are
    left out of the denominator)."""
    w = weight.detach().to(H.device, torch.float64)
    d = w - new_weight.detach().to(H.device, torch.float64)
    h = H.to(torch.float64)
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else float(num > 0)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@dataclass
class _BlockCall:
    """How the model called its first block for one batch: the call's arguments and keyword
    arguments, with the hidden states (the first argument) replaced by the current block
    inputs when a block is run."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    by_keyword: bool = False  # the hidden states were passed as ``hidden_states=``


BlockFn = Callable[[BlockLayout, dict[str, InputStats]], None]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, layout: ModelLayout, ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[_BlockCall]]:
    """The first block's hidden-state inputs for each batch of ``ids`` (B, T), and the rest of
    the call (mask, positions, ...) as the model made it."""
    blocks = model.get_submodule(layout.blocks_path)
    device = model_device(model)
    inputs: list[torch.Tensor] = []
    calls: list[_BlockCall] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            inputs.append(args[0].detach())
            calls.append(_BlockCall(tuple(args[1:]), dict(kwargs)))
        else:
            rest = dict(kwargs)
            inputs.append(rest.pop("hidden_states").detach())
            calls.append(_BlockCall((), rest, by_keyword=True))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device))
            except _Captured:
                continue
            raise RuntimeError("the model's forward pass never reached its first block")
    finally:
        handle.remove()
    return inputs, calls


def _run_block(block: nn.Module, hidden: torch.Tensor, call: _BlockCall) -> torch.Tensor:
    if call.by_keyword:
        return _first(block(**call.kwargs, hidden_states=hidden))
    return _first(block(hidden, *call.args, **call.kwargs))


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    layout: ModelLayout,
    ids: torch.Tensor,
    linears: dict[int, list[str]],
    on_block: BlockFn,
    batch_size: int = 8,
) -> None:
    """Calibrate ``model`` block by block on ``ids`` (samples, seq_len) (see the module
    docstring). ``linears`` names, per block index, the linear layers whose input statistics
    ``on_block(block, stats)`` receives; it may rewrite any weights of that block. Blocks with
    no listed layer are only run forward."""
    was_training = model.training
    model.eval()
    blocks = model.get_submodule(layout.blocks_path)
    hidden, calls = capture_block_inputs(model, layout, ids, batch_size)
    last = max(linears, default=-1)
    for block_layout in layout.blocks:
        if block_layout.index > last:
            break  # no later block has a layer to calibrate
        block = blocks[block_layout.index]
        names = linears.get(block_layout.index, [])
        if names:
            stats: dict[str, InputStats] = {}
            handles = []
            for name in names:
                lin = model.get_submodule(name)
                stats[name] = InputStats(lin.in_features, lin.weight.device)
                handles.append(
                    lin.register_forward_hook(
                        lambda _m, args, _out, s=stats[name]: s.add(args[0])  # type: ignore[misc]
                    )
                )
            try:
                for h, call in zip(hidden, calls):
                    _run_block(block, h, call)
            finally:
                for handle in handles:
                    handle.remove()
            on_block(block_layout, stats)
            del stats
        hidden = [_run_block(block, h, call) for h, call in zip(hidden, calls)]
        log.debug("calibrated block %d", block_layout.index)
    model.train(was_training)


def block_linears(
    layout: ModelLayout, selected: list[str]
) -> tuple[dict[int, list[str]], list[str]]:
    """The ``selected`` linear layers grouped by block index (in forward order), and those
    that are in no block (e.g. an untied LM head)."""
    chosen = set(selected)
    by_block: dict[int, list[str]] = {}
    inside: set[str] = set()
    for b in layout.blocks:
        names = [n for n in b.linears if n in chosen]
        if names:
            by_block[b.index] = names
            inside.update(names)
    return by_block, [n for n in selected if n not in inside]
