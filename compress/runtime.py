"""Process-wide runtime settings for CPU inference, applied by entry points, never on import,
and handing freed memory back to the OS between variants."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30
_GLIBC_DEFAULT = 128 * 1024  # glibc's initial mmap and trim thresholds
_tuned = False


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
    global _tuned
    _tuned = True
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


@contextmanager
def building_allocator() -> Iterator[None]:
    """glibc's default thresholds while a model is copied and converted, the tuned ones after.

    Building a variant allocates and frees every layer's weights once or more (the copy, the
    quantizer's temporaries); with the raised thresholds those large blocks come from the heap,
    where the smaller quantized tensors fill the holes they leave and the heap grows past the
    model's size. Below the default mmap threshold each large block is its own mapping, gone
    from the process when freed. Does nothing unless :func:`tune_allocator` was applied.
    """
    libc = _libc() if _tuned else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
