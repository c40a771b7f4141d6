"""Lazy, quiet import of bitsandbytes (an import costs time and is only needed by quantizers)."""

from __future__ import annotations

import logging
from types import ModuleType


def import_bnb() -> ModuleType:
    # On CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional 4-bit GEMM kernel from a
    # model hub at import and warns when it can't (always, offline). Its own kernel is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # LLM.int8() quantizes activations through fp16 by design; bitsandbytes warns about it on
    # every fp32 forward pass, which would flood a run's output.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes
