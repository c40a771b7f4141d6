"""Choosing which modules a stage touches: one walker, shared by every compressor.

A selector is an exact module name (``blocks.0.attn.q_proj``), a dotted suffix (``q_proj``,
``attn.q_proj``) or a regular expression prefixed with ``re:`` (``re:blocks\\.[01]\\..*``),
matched against the whole name. A selector that matches no module is an error, so a typo never
turns into a silent no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from compress.errors import CompressError


def matches(name: str, selector: str) -> bool:
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    return name == selector or name.endswith("." + selector)


@dataclass
class Selection:
    selected: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"module": name, "reason": why}


def _leaf_modules_with_params(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]


def _tied_owner(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Name of another module sharing this module's weight tensor, if any."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    for other_name, other in model.named_modules():
        if other is not module and getattr(other, "weight", None) is weight:
            return other_name
    return None


def select_modules(
    model: nn.Module,
    kinds: tuple[type[nn.Module], ...],
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    stage: str = "stage",
) -> Selection:
    """Pick the leaf modules of ``kinds`` named by ``targets`` (all if None), minus ``ignore``.

    Every other leaf module that holds parameters is listed in ``skipped`` with its reason.
    Tied weights (e.g. an LM head sharing the embedding matrix) are skipped: converting one
    side would store a second copy.
    """
    ignore = list(ignore or [])
    leaves = _leaf_modules_with_params(model)
    names = [n for n, _ in leaves]
    for key, selectors in (("targets", targets or []), ("ignore", ignore)):
        for sel in selectors:
            if sel.startswith("re:"):
                try:
                    re.compile(sel[3:])
                except re.error as exc:
                    raise CompressError(f"{stage}.{key}: invalid regex {sel!r}: {exc}") from None
            if not any(matches(n, sel) for n in names):
                raise CompressError(
                    f"{stage}.{key}: selector {sel!r} matches no module; "
                    f"modules are e.g. {', '.join(names[:6])}"
                )
    out = Selection()
    for name, module in leaves:
        kind = type(module).__name__
        if targets is not None and not any(matches(name, s) for s in targets):
            out.skipped.append({"module": name, "reason": "not targeted"})
        elif hit := next((s for s in ignore if matches(name, s)), None):
            out.skipped.append({"module": name, "reason": f"ignored by selector {hit!r}"})
        elif not isinstance(module, kinds):
            allowed = "/".join(k.__name__ for k in kinds)
            out.skipped.append({"module": name, "reason": f"{kind} is not a {allowed} layer"})
        elif owner := _tied_owner(model, name, module):
            out.skipped.append({"module": name, "reason": f"weight tied to {owner}"})
        else:
            out.selected.append((name, module))
    return out


def nothing_selected(stage: str, skipped: list[dict]) -> CompressError:
    """The error of a stage that would convert no layer: one line, with the reasons counted
    (e.g. ``int8: converts no layer (every candidate was skipped: 6x Linear8bitLt weight is
    torch.int8, already quantized; 1x ignored by selector 'lm_head')``)."""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    reasons = "; ".join(f"{n}x {r}" for r, n in top[:4])
    more = f"; {len(top) - 4} more reasons" if len(top) > 4 else ""
    why = f"every candidate was skipped: {reasons}{more}" if skipped else "the model has no layers"
    return CompressError(f"{stage}: converts no layer ({why}); check targets/ignore")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
