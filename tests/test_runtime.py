"""compress.runtime: the allocator tuning keeps freed memory; release_memory hands it back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import json, psutil, torch
    from compress.runtime import release_memory, tune_allocator

    def rss():
        return psutil.Process().memory_info().rss

    tune_allocator()
    before = rss()
    layers = [torch.ones(2_000_000) for _ in range(50)]  # 400 MB in 8 MB tensors, like layers
    held = rss()
    del layers
    freed = rss()
    trimmed = release_memory()
    print(json.dumps({"before": before, "held": held, "freed": freed,
                      "released": rss(), "trimmed": trimmed}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_release_memory_returns_freed_tensors_to_the_os() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, check=True
    )
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    size = 400e6
    assert m["held"] - m["before"] > 0.9 * size, m  # the tensors were resident
    assert m["trimmed"], m
    assert m["released"] - m["before"] < 0.1 * size, m  # and are not any more
