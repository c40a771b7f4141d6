"""Structured pruning with torch-pruning: remove whole attention heads, MLP hidden channels and
(optionally) residual channels.

Two drivers share the config, the widths (:func:`target_widths`) and the report. The built-in
GPT is pruned through torch-pruning's dependency graph, as described below. Every other family
with a layout (GPT-2, OPT, the Llama family) is cut by
:mod:`compress.compressors.structured_layout`: groups from the adapter's block layout (grouped-
query attention kept consistent, fused ``q|k|v`` cut head by head, gate/up/down together), then
``adapter.sync_config`` so the model's config (and ``from_pretrained``) describes it. What a
family's config cannot describe is refused before anything is cut
(``adapter.structured_refusal``): GPT-2's and OPT's heads (their head width is hidden / heads)
and the residual width of Hugging Face models.

Unlike unstructured sparsity, the result is a physically smaller dense model: every block keeps
``n_head * (1 - ratio)`` heads (each still ``head_dim`` wide) and ``mlp_hidden * (1 - ratio)``
MLP channels, rounded as described in :func:`target_widths`. With ``residual_ratio`` 0 (the
default) the residual width ``n_embd`` is kept, so the embeddings, layer norms and the tied LM
head are untouched and the output projections (``o_proj``, ``fc_out``) only lose input columns.

``residual_ratio > 0`` also narrows the residual stream to ``n_embd * (1 - residual_ratio)``
channels (see :func:`residual_width`), the same channels everywhere the stream appears: the token
and position embeddings, every LayerNorm, the input columns of q/k/v, ``fc_in`` and the LM head
and the output rows of ``o_proj`` and ``fc_out``. This runs after the head/MLP pass, on the
already narrowed blocks.

How torch-pruning is driven (the recipe that works on this GPT, see DESIGN.md): its dependency
graph traces one forward pass and couples ``q_proj``/``k_proj``/``v_proj`` rows with the
``o_proj`` columns through ``scaled_dot_product_attention``; ``num_heads`` is declared per
projection and ``prune_num_heads=True``/``prune_head_dims=False`` removes whole heads. Every
module whose *output* width must not change is in ``ignored_layers``. Ranking is local (per
block), so all blocks end up with the same widths and :class:`GPTConfig` can describe the model.

The residual pass asks torch-pruning for the dependency group of the token embedding's
channels (the tied LM head stays tied: it is the same tensor), checks that the group couples
exactly the layers listed above, and scores each channel with the configured importance over
that group (torch-pruning's group reduction: the mean over the coupled layers of each layer's
score, e.g. the squared L2 norm of the column/row/gain the channel owns for ``magnitude``). The
tensors are then sliced here rather than by ``group.prune()``: torch-pruning 1.6.1's LayerNorm
pruner can permute the kept channels (it calls ``Tensor.sort()`` and drops the result), which
would silently scramble the norms' gains against every other layer. Caveats of that score:
torch-pruning scores no ``nn.Embedding``, so the token embedding counts through the tied LM
head's columns (the same numbers) and the position embedding not at all; with ``magnitude``
the head's columns dominate the mean (on the tiny baseline ~4.6 against ~1 for a norm gain and
<0.4 for a projection), and ``lamp`` ranks exactly like ``magnitude`` within one group.

Importance criteria: ``magnitude`` (group L2 norm of the rows/columns a head or channel owns),
``taylor`` (|weight x gradient| of next-token cross-entropy on a few seeded training batches),
``lamp`` (LAMP-normalized magnitude) and ``random`` (a seeded baseline to beat).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from compress.compressors.base import StageConfig, StageContext, StageReport, register
from compress.compressors.structured_layout import (
    HeadPlan,
    check_layers,
    plan_heads,
    prune_by_layout,
)
from compress.errors import CompressError
from compress.evaluate.memory import stored_tensors
from compress.models.adapter import ModelAdapter, ModelLayout, adapter_for
from compress.models.gpt import GPT

log = logging.getLogger(__name__)

MLP_MULTIPLE = 8  # MLP widths are kept a multiple of this (when the layer is at least 16 wide)
CALIBRATION_SEQ_LEN = 128  # longest calibration window (capped by the model's block_size)


class StructuredConfig(StageConfig):
    ratio: float = Field(
        0.3, ge=0.0, lt=1.0, description="fraction of heads and of MLP channels removed per block"
    )
    residual_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of residual channels (n_embd) removed"
    )
    importance: Literal["magnitude", "taylor", "lamp", "random"] = "magnitude"
    prune_heads: bool = True
    prune_mlp: bool = True
    calibration_batches: int = Field(4, ge=1, description="taylor only: batches of gradients")
    calibration_batch_size: int = Field(8, ge=1, description="taylor only: sequences per batch")

    @model_validator(mode="after")
    def _something_to_prune(self) -> StructuredConfig:
        if self.residual_ratio > 0:
            return self
        if not (self.prune_heads or self.prune_mlp):
            raise ValueError(
                "prune_heads and prune_mlp are both false and residual_ratio is 0: nothing to prune"
            )
        if self.ratio == 0:
            raise ValueError("ratio and residual_ratio are both 0: nothing to prune")
        return self


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _round_to_multiple(width: int, ratio: float) -> int:
    """``width * (1 - ratio)`` to the nearest multiple of ``MLP_MULTIPLE`` (at least one) when
    ``width`` is at least twice that, else to the nearest whole channel (at least one); never
    more than ``width``."""
    kept = width * (1 - ratio)
    if width >= 2 * MLP_MULTIPLE:
        out = MLP_MULTIPLE * max(1, _round_half_up(kept / MLP_MULTIPLE))
    else:
        out = max(1, _round_half_up(kept))
    return min(out, width)


def residual_width(n_embd: int, cfg: StructuredConfig) -> int:
    """Residual channels kept: ``n_embd * (1 - residual_ratio)`` rounded like the MLP width (a
    multiple of ``MLP_MULTIPLE``, at least one, when ``n_embd`` is at least twice that)."""
    if cfg.residual_ratio == 0:
        return n_embd
    return _round_to_multiple(n_embd, cfg.residual_ratio)


def target_widths(n_head: int, mlp_hidden: int, cfg: StructuredConfig) -> tuple[int, int]:
    """Heads and MLP channels kept per block.

    Both are rounded to the nearest whole unit (half up), so ``ratio=0.3`` keeps 3 of 4 heads
    (torch-pruning itself would round the removed count up and keep 2). At least one head is
    kept; the MLP keeps a multiple of ``MLP_MULTIPLE`` channels (at least one multiple) when it
    is at least twice that wide, otherwise at least one channel.
    """
    if cfg.ratio == 0:
        return n_head, mlp_hidden
    heads = n_head
    if cfg.prune_heads:
        heads = min(n_head, max(1, _round_half_up(n_head * (1 - cfg.ratio))))
    mlp = mlp_hidden
    if cfg.prune_mlp:
        mlp = _round_to_multiple(mlp_hidden, cfg.ratio)
    return heads, mlp


def make_importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    return tp.importance.RandomImportance()


def _check_model(model: nn.Module) -> GPT:
    adapter_for(model).layout(model)  # a family without a known layout says so here
    if not isinstance(model, GPT):
        raise CompressError(
            f"structured: supports the built-in compress GPT only, got {type(model).__name__}"
        )
    cfg = model.config
    for i, block in enumerate(model.blocks):
        layers = {
            "attn.q_proj": block.attn.q_proj,
            "attn.k_proj": block.attn.k_proj,
            "attn.v_proj": block.attn.v_proj,
            "attn.o_proj": block.attn.o_proj,
            "mlp.fc_in": block.mlp.fc_in,
            "mlp.fc_out": block.mlp.fc_out,
        }
        for name, layer in layers.items():
            if type(layer) is not nn.Linear:
                raise CompressError(
                    f"structured: blocks.{i}.{name} is a {type(layer).__name__}, not nn.Linear; "
                    "run structured pruning before quantization"
                )
            if nn.utils.parametrize.is_parametrized(layer) or layer._forward_pre_hooks:
                raise CompressError(
                    f"structured: blocks.{i}.{name} carries a parametrization or hook (e.g. a "
                    "pruning mask); make it permanent before structured pruning"
                )
        if block.attn.q_proj.out_features != cfg.n_head * cfg.head_dim:
            raise CompressError(
                f"structured: blocks.{i}.attn.q_proj has {block.attn.q_proj.out_features} "
                f"outputs but the config says n_head * head_dim = {cfg.n_head * cfg.head_dim}"
            )
        if block.mlp.fc_in.out_features != cfg.mlp_hidden:
            raise CompressError(
                f"structured: blocks.{i}.mlp.fc_in has {block.mlp.fc_in.out_features} outputs "
                f"but the config says mlp_hidden = {cfg.mlp_hidden}"
            )
    if any(p.is_inference() for p in model.parameters()):
        raise CompressError(
            "structured: the model's weights are inference tensors (made under "
            "torch.inference_mode), which autograd cannot trace; build or copy it outside"
        )
    return model


def _accumulate_gradients(model: nn.Module, cfg: StructuredConfig, ctx: StageContext) -> None:
    """Sum gradients of next-token cross-entropy over seeded random windows of the train split."""
    ids = ctx.tokens.get("train")
    seq = min(CALIBRATION_SEQ_LEN, adapter_for(model).max_seq_len(model) or CALIBRATION_SEQ_LEN)
    if ids is None or ids.numel() < seq + 2:
        have = "no train split" if ids is None else f"{ids.numel()} train tokens"
        raise CompressError(
            f"structured.importance: 'taylor' needs at least {seq + 2} train tokens for its "
            f"gradients, got {have}"
        )
    gen = torch.Generator().manual_seed(ctx.seed)
    offsets = torch.arange(seq + 1)
    model.zero_grad(set_to_none=True)
    for _ in range(cfg.calibration_batches):
        starts = torch.randint(
            0, ids.numel() - seq - 1, (cfg.calibration_batch_size,), generator=gen
        )
        w = ids[starts[:, None] + offsets].long()  # (B, T+1)
        logits = model(w[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
        loss.backward()


def _weighted_leaves(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that holds parameters of its own and has no children, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    }


def _leaf_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(m.weight.shape) for name, m in _weighted_leaves(model).items()}


def _storage_keys(module: nn.Module) -> dict[tuple[int, int, int], int]:
    """The module's stored tensors as {identity: bytes}, so tied tensors can be counted once."""
    return {
        (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()): t.nbytes
        for t in stored_tensors(module).values()
    }


def _distinct_bytes(per_module: list[dict[tuple[int, int, int], int]]) -> int:
    merged: dict[tuple[int, int, int], int] = {}
    for keys in per_module:
        merged.update(keys)
    return sum(merged.values())


def _example_input(gcfg, seed: int) -> torch.Tensor:
    """The seeded token window torch-pruning traces its dependency graph with."""
    return torch.randint(
        0,
        gcfg.vocab_size,
        (1, min(CALIBRATION_SEQ_LEN, gcfg.block_size)),
        generator=torch.Generator().manual_seed(seed),
    )


def _prune(model: GPT, cfg: StructuredConfig, example: torch.Tensor, heads: int, mlp: int) -> None:
    """Run torch-pruning in place so that every block keeps ``heads`` heads and ``mlp`` channels."""
    import torch_pruning as tp

    gcfg = model.config
    prune_heads = heads < gcfg.n_head
    prune_mlp = mlp < gcfg.mlp_hidden
    prunable: list[nn.Module] = []
    num_heads: dict[nn.Module, int] = {}
    mlp_ratios: dict[nn.Module, float] = {}
    for block in model.blocks:
        if prune_heads:
            qkv = (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)
            prunable += qkv
            num_heads.update({p: gcfg.n_head for p in qkv})
        if prune_mlp:
            prunable.append(block.mlp.fc_in)
            # torch-pruning keeps int(N * (1 - r)) channels: aim half a channel above the target
            # so float rounding cannot move it.
            mlp_ratios[block.mlp.fc_in] = (gcfg.mlp_hidden - mlp - 0.5) / gcfg.mlp_hidden
    # Everything else keeps its output width: embeddings, norms, o_proj, fc_out, lm_head (and
    # q/k/v or fc_in when that part is not pruned). Their input columns may still be removed.
    ids_prunable = {id(m) for m in prunable}
    ignored = [
        m
        for m in model.modules()
        if id(m) not in ids_prunable
        and not list(m.children())
        and any(True for _ in m.parameters(recurse=False))
    ]
    n_heads_removed = gcfg.n_head - heads
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=make_importance(cfg.importance),
        global_pruning=False,  # rank within each block: uniform widths across blocks
        # Only a gate for the attention groups (head dims are never pruned): torch-pruning
        # removes heads only inside its width-pruning pass, which needs a positive ratio.
        pruning_ratio=0.5,
        pruning_ratio_dict=mlp_ratios,
        ignored_layers=ignored,
        round_to=MLP_MULTIPLE if prune_mlp and mlp % MLP_MULTIPLE == 0 else None,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        # torch-pruning removes ceil(ratio * n_head) heads: half a head below the target count.
        head_pruning_ratio=(n_heads_removed - 0.5) / gcfg.n_head if prune_heads else 0.0,
    )
    pruner.step()


def _residual_layers(model: GPT) -> dict[str, list[nn.Module]]:
    """Every layer the residual stream passes through, by the side of it that is residual:
    ``out`` = output channels (embedding columns, norm gains, ``o_proj``/``fc_out`` rows),
    ``in`` = input columns (q/k/v, ``fc_in``, the LM head)."""
    out: list[nn.Module] = [model.tok_emb, model.pos_emb]
    into: list[nn.Module] = []
    for b in model.blocks:
        out += [b.ln_1, b.attn.o_proj, b.ln_2, b.mlp.fc_out]
        into += [b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.mlp.fc_in]
    out.append(model.ln_f)
    into.append(model.lm_head)
    return {"out": out, "in": into}


def _residual_importance(model: GPT, cfg: StructuredConfig, example: torch.Tensor) -> torch.Tensor:
    """One score per residual channel: the configured importance over torch-pruning's dependency
    group of the token embedding's channels, after checking that group is the residual stream."""
    import torch_pruning as tp

    n = model.config.n_embd
    dg = tp.DependencyGraph().build_dependency(model, example)
    group = dg.get_pruning_group(
        model.tok_emb, tp.prune_embedding_out_channels, idxs=list(range(n))
    )
    names = {id(m): name for name, m in model.named_modules()}
    layers = _residual_layers(model)
    want = {(names[id(m)], "out") for m in layers["out"]} | {
        (names[id(m)], "in") for m in layers["in"]
    }
    handlers = {
        "out": (
            tp.prune_embedding_out_channels,
            tp.prune_layernorm_out_channels,
            tp.prune_linear_out_channels,
        ),
        "in": (tp.prune_linear_in_channels,),
    }
    got = set()
    for dep, _ in group:
        module = dep.target.module
        if id(module) not in names:
            continue  # a traced op (add, reshape, transpose): no weights
        side = next((s for s, fns in handlers.items() if dep.handler in fns), repr(dep.handler))
        got.add((names[id(module)], side))
    if got != want:
        raise CompressError(
            "structured.residual_ratio: torch-pruning's dependency group for the residual "
            f"channels is not the residual stream: missing {sorted(want - got)}, unexpected "
            f"{sorted(got - want)}"
        )
    scores = make_importance(cfg.importance)(group)
    if scores is None or scores.shape != (n,) or not torch.isfinite(scores).all():
        raise CompressError(
            f"structured.residual_ratio: importance {cfg.importance!r} gave no usable score for "
            "the residual channels (e.g. all-zero gradients for taylor)"
        )
    return scores.detach().float()


def _slice_param(p: torch.Tensor, dim: int, keep: torch.Tensor) -> nn.Parameter:
    new = nn.Parameter(p.detach().index_select(dim, keep).clone(), requires_grad=p.requires_grad)
    if p.grad is not None:
        new.grad = p.grad.index_select(dim, keep).clone()
    return new


def _slice_residual(model: GPT, keep: torch.Tensor) -> None:
    """Keep only the residual channels ``keep`` (sorted indices) in every layer that carries the
    residual stream; the LM head is re-tied to the narrowed token embedding."""
    k = int(keep.numel())
    for emb in (model.tok_emb, model.pos_emb):
        emb.weight = _slice_param(emb.weight, 1, keep)
        emb.embedding_dim = k
    for block in model.blocks:
        for ln in (block.ln_1, block.ln_2):
            _slice_layernorm(ln, keep)
        for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.fc_in):
            lin.weight = _slice_param(lin.weight, 1, keep)
            lin.in_features = k
        for lin in (block.attn.o_proj, block.mlp.fc_out):
            lin.weight = _slice_param(lin.weight, 0, keep)
            if lin.bias is not None:
                lin.bias = _slice_param(lin.bias, 0, keep)
            lin.out_features = k
    _slice_layernorm(model.ln_f, keep)
    model.lm_head.weight = model.tok_emb.weight  # tied, as before
    model.lm_head.in_features = k


def _slice_layernorm(ln: nn.LayerNorm, keep: torch.Tensor) -> None:
    if ln.weight is not None:
        ln.weight = _slice_param(ln.weight, 0, keep)
    if ln.bias is not None:
        ln.bias = _slice_param(ln.bias, 0, keep)
    ln.normalized_shape = (int(keep.numel()),)


def _prune_residual(
    model: GPT, cfg: StructuredConfig, example: torch.Tensor, n_embd: int
) -> torch.Tensor:
    """Narrow the residual stream to the ``n_embd`` most important channels; returns them."""
    scores = _residual_importance(model, cfg, example)
    # Highest scores kept; ties go to the lower index (stable sort), so runs are reproducible.
    order = torch.argsort(-scores, stable=True)
    keep = order[:n_embd].sort().values
    _slice_residual(model, keep)
    return keep


def _check_uniform(model: GPT, heads: int, mlp: int, n_embd: int) -> None:
    hd = model.config.head_dim
    got = [
        (
            b.attn.q_proj.out_features,
            b.attn.k_proj.out_features,
            b.attn.v_proj.out_features,
            b.attn.o_proj.in_features,
            b.mlp.fc_in.out_features,
            b.mlp.fc_out.in_features,
        )
        for b in model.blocks
    ]
    want = (heads * hd,) * 4 + (mlp,) * 2
    if any(g != want for g in got):
        raise CompressError(
            "structured: torch-pruning did not produce the same widths in every block, so "
            f"GPTConfig cannot describe the result: wanted (q, k, v, o_in, fc_in, fc_out_in) = "
            f"{want} per block, got {got}"
        )
    layers = _residual_layers(model)
    widths = [m.weight.shape[-1] for m in (model.tok_emb, model.pos_emb)]
    widths += [m.weight.shape[0] for m in layers["out"][2:]]
    widths += [m.bias.shape[0] for m in layers["out"][2:] if m.bias is not None]
    widths += [m.normalized_shape[-1] for m in layers["out"] if isinstance(m, nn.LayerNorm)]
    widths += [m.weight.shape[1] for m in layers["in"]]
    widths += [m.in_features for m in layers["in"]]
    widths += [m.out_features for m in layers["out"] if isinstance(m, nn.Linear)]
    if any(w != n_embd for w in widths) or model.lm_head.weight is not model.tok_emb.weight:
        raise CompressError(
            f"structured: the residual width is not {n_embd} everywhere (or the LM head is no "
            f"longer tied to the token embedding): {widths}"
        )


@register("structured", StructuredConfig)
def apply_structured(
    model: nn.Module, cfg: StructuredConfig, ctx: StageContext
) -> tuple[nn.Module, StageReport]:
    """Structured pruning (torch-pruning): removes whole heads, MLP and residual channels."""
    adapter = adapter_for(model)
    layout = adapter.layout(model)  # a family without a known layout says so here
    if not isinstance(model, GPT):
        return _apply_by_layout(model, cfg, ctx, adapter, layout)
    model = _check_model(model)
    gcfg = model.config
    heads, mlp = target_widths(gcfg.n_head, gcfg.mlp_hidden, cfg)
    n_embd = residual_width(gcfg.n_embd, cfg)
    prune_blocks = heads < gcfg.n_head or mlp < gcfg.mlp_hidden
    prune_residual = n_embd < gcfg.n_embd
    if not (prune_blocks or prune_residual):
        residual = (
            f" and residual_ratio {cfg.residual_ratio} no residual channels (of {gcfg.n_embd})"
            if cfg.residual_ratio > 0
            else ""
        )
        raise CompressError(
            f"structured.ratio: {cfg.ratio} removes no whole head (of {gcfg.n_head}) and no MLP "
            f"channels (of {gcfg.mlp_hidden}){residual} once rounded; use a larger ratio"
        )
    report = StageReport(stage="structured", config=cfg.model_dump())
    leaves_before = _weighted_leaves(model)
    shapes_before = _leaf_shapes(model)
    storage_before = {name: _storage_keys(m) for name, m in leaves_before.items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    # The dependency graph is traced through autograd: grads on even if the caller is in
    # no_grad/inference mode.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(ctx.seed)  # RandomImportance draws from the global generator
        example = _example_input(gcfg, ctx.seed)  # made here: not an inference tensor
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            if cfg.importance == "taylor":
                _accumulate_gradients(model, cfg, ctx)
            if prune_blocks:
                _prune(model, cfg, example, heads, mlp)
            if prune_residual:
                _prune_residual(model, cfg, example, n_embd)
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))
                p.grad = None
            model.eval()

    _check_uniform(model, heads, mlp, n_embd)
    model.config = dataclasses.replace(gcfg, n_head=heads, mlp_hidden=mlp, n_embd=n_embd)
    for block in model.blocks:
        block.attn.n_head = heads

    shapes_after = _leaf_shapes(model)
    touched_before, touched_after = [], []
    for name, before in shapes_before.items():
        after = shapes_after[name]
        if after == before:
            continue
        report.touched.append({"module": name, "from": before, "to": after})
        touched_before.append(storage_before[name])
        touched_after.append(_storage_keys(model.get_submodule(name)))
    # Tied tensors (the LM head is the token embedding) count once.
    report.touched_bytes_before = _distinct_bytes(touched_before)
    report.touched_bytes_after = _distinct_bytes(touched_after)
    touched = {t["module"] for t in report.touched}
    keeps_residual = (
        "residual_ratio is 0"
        if cfg.residual_ratio == 0
        else f"residual_ratio {cfg.residual_ratio} removes no channels once rounded"
    )
    for name, m in leaves_before.items():
        if name in touched:
            continue
        if isinstance(m, nn.Embedding):
            reason = f"embedding (keeps the residual width: {keeps_residual})"
        elif m is model.lm_head:
            reason = f"weight tied to tok_emb (keeps the residual width: {keeps_residual})"
        elif isinstance(m, nn.LayerNorm):
            reason = f"LayerNorm keeps the residual width ({keeps_residual})"
        elif name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            if not cfg.prune_heads:
                why = "prune_heads is false"
            elif cfg.ratio == 0:
                why = "ratio is 0"
            else:
                why = "ratio removes no whole head"
            reason = f"{why} ({gcfg.n_head} heads)"
        elif name.endswith(("fc_in", "fc_out")):
            if not cfg.prune_mlp:
                why = "prune_mlp is false"
            elif cfg.ratio == 0:
                why = "ratio is 0"
            else:
                why = "ratio removes no MLP channels"
            reason = f"{why} ({gcfg.mlp_hidden} channels)"
        else:
            reason = f"{type(m).__name__} is not pruned by this stage"
        report.skipped.append({"module": name, "reason": reason})
    report.extra = {
        "heads_before": gcfg.n_head,
        "heads_after": heads,
        "mlp_hidden_before": gcfg.mlp_hidden,
        "mlp_hidden_after": mlp,
        "n_embd_before": gcfg.n_embd,
        "n_embd_after": n_embd,
        "importance": cfg.importance,
    }
    log.info(
        "structured (%s): heads %d -> %d, mlp_hidden %d -> %d in each of %d blocks, "
        "n_embd %d -> %d",
        cfg.importance,
        gcfg.n_head,
        heads,
        gcfg.mlp_hidden,
        mlp,
        gcfg.n_layer,
        gcfg.n_embd,
        n_embd,
    )
    return model, report


# ---------------------------------------------------------------------------------------------
# Every other family: the layout-driven pruner (compress.compressors.structured_layout)


def _refuse_unsupported(model: nn.Module, cfg: StructuredConfig, adapter: ModelAdapter) -> None:
    asked = {
        "prune_heads": ("heads", cfg.prune_heads and cfg.ratio > 0),
        "prune_mlp": ("mlp", cfg.prune_mlp and cfg.ratio > 0),
        "residual_ratio": ("residual", cfg.residual_ratio > 0),
    }
    for key, (part, wanted) in asked.items():
        if wanted and (why := adapter.structured_refusal(model, part)):
            raise CompressError(f"structured.{key}: {why}")


def _layout_widths(model: nn.Module, layout: ModelLayout) -> list[tuple[int, int, int, int]]:
    """Per block, from the modules themselves: (query heads, kv heads, MLP width, hidden)."""
    out = []
    for b in layout.blocks:
        hd = b.head_dim
        if b.qkv:
            rows = model.get_submodule(b.qkv).out_features
            o_in = model.get_submodule(b.o).in_features
            q, kv = o_in // hd, (rows - o_in) // (2 * hd)
        else:
            q = model.get_submodule(b.q).out_features // hd
            kv = model.get_submodule(b.k).out_features // hd
        mlp = model.get_submodule(b.mlp_down).in_features
        out.append((q, kv, mlp, model.get_submodule(b.o).out_features))
    return out


def _apply_by_layout(
    model: nn.Module,
    cfg: StructuredConfig,
    ctx: StageContext,
    adapter: ModelAdapter,
    layout: ModelLayout,
) -> tuple[nn.Module, StageReport]:
    """Heads (grouped-query consistent) and MLP channels of a family described by its layout."""
    _refuse_unsupported(model, cfg, adapter)
    check_layers(model, layout)
    first = layout.blocks[0]
    widths = {(b.n_heads, b.n_kv_heads, b.mlp_hidden) for b in layout.blocks}
    if len(widths) > 1:
        raise CompressError(f"structured: the blocks differ in width {sorted(widths)}")
    heads: HeadPlan | None = None
    if cfg.prune_heads and cfg.ratio > 0:
        heads = plan_heads(first, cfg.ratio)
        heads = heads if heads.q < first.n_heads else None
    mlp: int | None = None
    if cfg.prune_mlp and cfg.ratio > 0:
        mlp = _round_to_multiple(first.mlp_hidden, cfg.ratio)
        mlp = mlp if mlp < first.mlp_hidden else None
    if heads is None and mlp is None:
        raise CompressError(
            f"structured.ratio: {cfg.ratio} removes no whole head group (of {first.n_heads} heads, "
            f"{first.n_kv_heads} key/value heads) and no MLP channels (of {first.mlp_hidden}) "
            "once rounded; use a larger ratio"
        )
    if cfg.importance == "taylor" and any(p.is_inference() for p in model.parameters()):
        raise CompressError(
            "structured: the model's weights are inference tensors (made under "
            "torch.inference_mode), which autograd cannot trace; build or copy it outside"
        )
    report = StageReport(stage="structured", config=cfg.model_dump())
    leaves_before = _weighted_leaves(model)
    shapes_before = _leaf_shapes(model)
    storage_before = {name: _storage_keys(m) for name, m in leaves_before.items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(ctx.seed)
        model.eval()
        try:
            if cfg.importance == "taylor":
                for p in model.parameters():
                    p.requires_grad_(p.is_floating_point())
                _accumulate_gradients(model, cfg, ctx)
            with torch.no_grad():
                prune_by_layout(model, layout, heads, mlp, cfg.importance, ctx.seed)
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))
                p.grad = None
    adapter.sync_config(model)

    after = adapter.layout(model)
    want_q = heads.q if heads else first.n_heads
    want_kv = heads.kv if heads else first.n_kv_heads
    want_mlp = mlp if mlp is not None else first.mlp_hidden
    want = (want_q, want_kv, want_mlp, layout.hidden)
    got = _layout_widths(model, after)
    described = [(b.n_heads, b.n_kv_heads, b.mlp_hidden, after.hidden) for b in after.blocks]
    if any(g != want for g in got) or any(d != want for d in described):
        raise CompressError(
            "structured: the pruned widths (query heads, kv heads, MLP, hidden) are not "
            f"{want} in every block: modules {got}, config {described}"
        )

    shapes_after = _leaf_shapes(model)
    touched_before, touched_after = [], []
    for name, before in shapes_before.items():
        if shapes_after.get(name) == before:
            continue
        report.touched.append({"module": name, "from": before, "to": shapes_after[name]})
        touched_before.append(storage_before[name])
        touched_after.append(_storage_keys(model.get_submodule(name)))
    report.touched_bytes_before = _distinct_bytes(touched_before)
    report.touched_bytes_after = _distinct_bytes(touched_after)
    touched = {t["module"] for t in report.touched}
    attention = {n for b in layout.blocks for n in (*b.attn_inputs, b.o)}
    mlp_layers = {n for b in layout.blocks for n in (*b.mlp_inputs, b.mlp_down)}
    for name in leaves_before:
        if name in touched:
            continue
        if name in attention:
            why = "prune_heads is false" if not cfg.prune_heads else "ratio removes no head group"
            reason = f"{why} ({first.n_heads} heads, {first.n_kv_heads} key/value heads)"
        elif name in mlp_layers:
            why = "prune_mlp is false" if not cfg.prune_mlp else "ratio removes no MLP channels"
            reason = f"{why} ({first.mlp_hidden} channels)"
        else:
            reason = f"keeps the residual width {layout.hidden} (residual_ratio is 0)"
        report.skipped.append({"module": name, "reason": reason})
    report.extra = {
        "heads_before": first.n_heads,
        "heads_after": want_q,
        "kv_heads_before": first.n_kv_heads,
        "kv_heads_after": want_kv,
        "head_unit": heads.unit if heads else None,
        "mlp_hidden_before": first.mlp_hidden,
        "mlp_hidden_after": want_mlp,
        "n_embd_before": layout.hidden,
        "n_embd_after": layout.hidden,
        "importance": cfg.importance,
    }
    log.info(
        "structured (%s, %s): heads %d -> %d (kv %d -> %d), mlp %d -> %d in each of %d blocks",
        layout.family,
        cfg.importance,
        first.n_heads,
        want_q,
        first.n_kv_heads,
        want_kv,
        first.mlp_hidden,
        want_mlp,
        len(layout.blocks),
    )
    return model, report
