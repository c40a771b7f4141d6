"""Model adapters: everything compress needs to know about a model family, in one place.

The rest of the package never reads a family's attribute names. It asks the model's adapter
(:func:`adapter_for`) for:

- ``layout(model)``: where the blocks are and, in each, the attention projections (q/k/v or
  one fused q|k|v), the output projection, the MLP (up, optional gate, down), the norms, the
  head counts (query and key/value heads, for grouped-query attention) and the head width;
  plus the token/position embeddings, the final norm, the LM head and whether it is tied;
- ``max_seq_len`` and ``vocab_size``;
- ``sync_config(model)`` after structured pruning changed widths, so the model's config
  describes it again;
- ``student(model, sizes, seed)``: a smaller, freshly initialised model of the same family;
- the saved form (``architecture`` / ``skeleton`` / ``finish_load``), used by
  :mod:`compress.variant`.

Every model compress handles maps token ids ``(B, T)`` to logits ``(B, T, V)`` when called,
so evaluation and training need no adapter at all. Adapters register per family like the
compressors do; a model no family claims gets the generic adapter, which supports every stage
that only needs "the linear layers" and refuses the others with a message naming the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from compress.errors import CompressError


class LayoutError(CompressError):
    """The model's family is not known well enough for a stage that needs its layout."""


@dataclass(frozen=True)
class BlockLayout:
    """One transformer block, by module names relative to the model's root.

    Attention is either three projections ``q``/``k``/``v`` or one fused ``qkv`` whose output
    rows are ``[q | k | v]`` (GPT-2's ``c_attn``). The MLP is ``down(act(up(x)))`` or, with a
    ``gate``, ``down(act(gate(x)) * up(x))`` (SwiGLU).
    """

    index: int
    prefix: str  # the block module itself, e.g. "blocks.0"
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str
    mlp_up: str
    mlp_gate: str | None
    mlp_down: str
    norms: tuple[str, ...]  # before attention, before the MLP
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int

    @property
    def attn_inputs(self) -> tuple[str, ...]:
        """The projections that read the block's (normed) input for attention."""
        return (self.qkv,) if self.qkv else tuple(n for n in (self.q, self.k, self.v) if n)

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        return tuple(n for n in (self.mlp_gate, self.mlp_up) if n)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear layer of the block, in the order the forward pass reaches them."""
        return (*self.attn_inputs, self.o, *self.mlp_inputs, self.mlp_down)


@dataclass(frozen=True)
class ModelLayout:
    family: str
    hidden: int  # residual width
    vocab_size: int
    blocks_path: str  # the ModuleList of blocks, e.g. "blocks" or "hf.model.layers"
    blocks: tuple[BlockLayout, ...]
    embed: str
    pos_embed: str | None  # learned absolute positions; None for rotary models
    final_norm: str
    lm_head: str
    tied: bool  # the LM head's weight is the token embedding
    norm: Literal["layernorm", "rmsnorm"]


class ModelAdapter:
    """Base class: what a family adapter implements. See the module docstring."""

    family: ClassVar[str] = "generic"
    has_layout: ClassVar[bool] = True  # False for the catch-all adapters

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, model: nn.Module) -> str:
        return type(model).__name__

    def layout(self, model: nn.Module) -> ModelLayout:
        raise LayoutError(
            f"{self.describe(model)}: its block layout is not known to compress (families with "
            f"a layout: {', '.join(f for f, a in ADAPTERS.items() if a.has_layout)}); stages "
            "that only need its linear layers (quantizers, magnitude pruning) still work"
        )

    def vocab_size(self, model: nn.Module) -> int:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> str | None:
        """The name of the output projection to the vocabulary, if the model has one."""
        return self.layout(model).lm_head

    def max_seq_len(self, model: nn.Module) -> int | None:
        return None

    def sync_config(self, model: nn.Module) -> None:
        """Make the model's config describe its (structurally pruned) widths again."""
        raise LayoutError(f"{self.describe(model)}: cannot describe a pruned model of this family")

    def structured_refusal(self, model: nn.Module, part: str) -> str | None:
        """Why structured pruning cannot narrow ``part`` (``"heads"``, ``"mlp"`` or
        ``"residual"``) in this family, so that the result still loads; None when it can."""
        return None

    def student(self, model: nn.Module, sizes: dict[str, int], seed: int) -> nn.Module:
        raise LayoutError(
            f"{self.describe(model)}: cannot build a smaller student of this family; "
            "use student: current"
        )

    def student_fields(self) -> tuple[str, ...]:
        return ()

    # -- the saved form (compress.variant) ----------------------------------------------------

    def architecture(self, model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> dict:
        """The manifest's ``architecture`` entry; may rename ``tensors`` in place and write
        companion files (an HF ``config.json``) into ``path``."""
        raise NotImplementedError

    def transformers_export(self, model: nn.Module, path: Path) -> dict | None:
        """For a Hugging Face model: whether ``AutoModelForCausalLM.from_pretrained`` can load
        the saved folder ``path`` (adding what it needs to its ``config.json``), and if not
        why; the manifest's ``transformers`` entry. None for models of no transformers family."""
        return None

    def skeleton(self, arch: dict, path: Path) -> nn.Module:
        """An empty model (CPU, weights not initialised) of the saved architecture."""
        raise NotImplementedError

    def load_tensors(self, arch: dict, tensors: dict[str, torch.Tensor]) -> dict:
        """The file's tensors under the model's own names (the inverse of ``architecture``)."""
        return tensors

    def finish_load(self, model: nn.Module, arch: dict, quantized: dict) -> set[str]:
        """Re-tie what was saved once, after the weights are in; returns the state-dict keys
        so filled (absent from the file by design)."""
        return set()


ADAPTERS: dict[str, ModelAdapter] = {}


class GenericAdapter(ModelAdapter):
    """A model no family claims: stages that need its layout refuse with a clear message."""

    family = "generic"
    has_layout = False

    def matches(self, model: nn.Module) -> bool:
        return False

    def vocab_size(self, model: nn.Module) -> int:
        raise LayoutError(f"{type(model).__name__}: unknown vocabulary size")


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    if cls.family in ADAPTERS:
        raise ValueError(f"model family {cls.family!r} registered twice")
    ADAPTERS[cls.family] = cls()
    return cls


register_adapter(GenericAdapter)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family; the generic one when no family claims it."""
    _load_families()
    for family, adapter in ADAPTERS.items():
        if family != "generic" and adapter.matches(model):
            return adapter
    return ADAPTERS["generic"]


def families() -> dict[str, ModelAdapter]:
    """Every registered family's adapter, by family name."""
    _load_families()
    return dict(ADAPTERS)


def adapter_by_family(family: str) -> ModelAdapter:
    _load_families()
    try:
        return ADAPTERS[family]
    except KeyError:
        raise CompressError(
            f"unknown model family {family!r}; known: {', '.join(sorted(ADAPTERS))}"
        ) from None


def _load_families() -> None:
    # Importing the modules registers their adapters (transformers itself is imported lazily).
    import compress.models.builtin  # noqa: F401
    import compress.models.hf  # noqa: F401


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else f"torch (CUDA {torch.version.cuda}) sees no CUDA device"
        )
        raise CompressError(f"device: 'cuda' asked for, but {why}; allowed here: auto, cpu")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (CPU for a model with none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
