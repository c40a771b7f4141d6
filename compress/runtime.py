"""Process-wide runtime settings for CPU inference, applied by entry points, never on import,
and handing freed memory back to the OS between variants."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30


def tune_allocator() -> str:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    CPU kernels (notably the int8 GEMMs) allocate multi-megabyte output and scratch buffers on
    every call; with glibc's defaults each is a fresh ``mmap`` that is page-faulted in again
    every time, which costs more than the int8 arithmetic saves. Raising the mmap and trim
    thresholds lets freed buffers be reused. It applies to every model in the process alike
    (fp32 included), the way jemalloc/tcmalloc are recommended for PyTorch CPU inference.
    Returns a description for the report.
    """
    if not sys.platform.startswith("linux"):
        return "system default (not Linux)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(
            _M_TRIM_THRESHOLD, _THRESHOLD
        )
    except (OSError, AttributeError) as exc:  # not glibc (e.g. musl): leave it alone
        log.info("allocator tuning unavailable: %s", exc)
        return "system default (no mallopt)"
    if not ok:
        return "system default (mallopt refused)"
    return f"glibc mallopt: mmap and trim thresholds {_THRESHOLD >> 20} MiB"


def release_memory() -> bool:
    """Hand freed memory back to the OS: a garbage collection, then glibc's ``malloc_trim``.

    With the thresholds :func:`tune_allocator` sets, freed tensors stay in the heap for reuse;
    after a large model is freed (a variant measured, the fp32 layers a quantizer replaced)
    that would keep the process as large as it was at its peak. Returns whether memory was
    trimmed (False where there is no glibc).
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
