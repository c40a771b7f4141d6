"""What the benchmark scripts share (run them as ``python benchmarks/<name>.py``)."""

from __future__ import annotations


def machine(env: dict) -> str:
    """``AMD EPYC x2, torch 2.13.0+cpu``: the machine column of every results row, from
    ``compress.workbench.environment()``."""
    return f"{env['processor']} x{env['cpu_count']}, torch {env['torch']}"
