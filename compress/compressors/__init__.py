"""Compressors: each a validated config plus one ``apply`` function, found by name in REGISTRY.

Importing this package registers the built-in compressors.
"""

from __future__ import annotations

from compress.compressors import (
    awq,  # noqa: F401  (registers awq)
    distill,  # noqa: F401  (registers distill)
    dynamic_int8,  # noqa: F401  (registers dynamic-int8)
    finetune,  # noqa: F401  (registers finetune)
    gptq,  # noqa: F401  (registers gptq)
    prune,  # noqa: F401  (registers prune)
    quantize,  # noqa: F401  (registers int8, nf4, fp4)
    rtn,  # noqa: F401  (registers rtn)
    structured,  # noqa: F401  (registers structured)
)
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
