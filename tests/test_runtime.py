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


BUILD = textwrap.dedent(
    """
    import contextlib, json, sys, psutil, torch
    from compress.runtime import building_allocator, tune_allocator

    def rss():
        return psutil.Process().memory_info().rss

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    tune_allocator()
    base = [torch.ones(2_000_000) for _ in range(25)]  # a 200 MB "baseline" of 8 MB layers
    before = rss()
    with building_allocator() if sys.argv[1] == "building" else contextlib.nullcontext():
        copy = [t.clone() for t in base]  # the variant's copy
        for i, t in enumerate(copy):  # a quantizer: a temporary, a smaller result
            tmp = t * 2
            copy[i] = (tmp / 127).to(torch.int8)
            del t, tmp
    print(json.dumps({"before": before, "after": rss(), "peak": hwm()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_building_a_variant_leaves_only_the_result_resident() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, "building"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    copy, result = 200e6, 50e6
    # the copy's fp32 layers and the temporaries are gone; the int8 result stays
    assert m["after"] - m["before"] < result + 0.1 * copy, m
    assert m["after"] - m["before"] > 0.8 * result, m
