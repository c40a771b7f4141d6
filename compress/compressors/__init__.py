"""Compressors: each a validated config plus one ``apply`` function, found by name in REGISTRY.

Importing this package registers the built-in compressors.
"""

from __future__ import annotations

from compress.compressors import quantize  # noqa: F401  (registers int8, nf4, fp4)
from compress.compressors.base import (
    REGISTRY,
    Compressor,
    StageConfig,
    StageContext,
    StageReport,
    register,
    run_stage,
)

__all__ = [
    "REGISTRY",
    "Compressor",
    "StageConfig",
    "StageContext",
    "StageReport",
    "register",
    "run_stage",
]
