"""The scan of a run's model: the recipe's ``scan:`` settings (defaults when it has none) on
the run's tokens, cached under the baseline's key."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.nn as nn

from compress.scan.allocation import Curve
from compress.scan.measure import Echo, ScanResult, cached_scan
from compress.scan.spec import ScanSpec

if TYPE_CHECKING:
    from compress.recipe import Recipe
    from compress.workbench import Workspace


def scan_spec(recipe: Recipe) -> ScanSpec:
    return recipe.scan if recipe.scan is not None else ScanSpec()


def scan_seq_len(recipe: Recipe) -> int:
    spec = scan_spec(recipe)
    return spec.seq_len or recipe.eval.perplexity.seq_len


def scan_workspace(
    ws: Workspace, model: nn.Module | None = None, echo: Echo | None = None
) -> ScanResult:
    """The scan of ``model`` (the baseline when None) in the run ``ws``."""
    recipe = ws.recipe
    return cached_scan(
        ws.baseline if model is None else model,
        ws.tokens,
        scan_spec(recipe),
        scan_seq_len(recipe),
        ws.baseline_info.key,
        recipe.calibration,
        f"{ws.corpus.fingerprint}:{ws.tokenizer.fingerprint}",
        echo,
    )


def sensitivity_for(ws: Workspace) -> Callable[[nn.Module], dict[str, Curve]]:
    """What a stage's ``ctx.sensitivity`` calls: the scan curves of the model it is given."""

    def sensitivity(model: nn.Module) -> dict[str, Curve]:
        return scan_workspace(ws, model).curves()

    return sensitivity
