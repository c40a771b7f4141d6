"""Compute-matched controls for variants that train.

A variant that trains (``distill``, ``finetune``) improves partly by recovering from its
compression and partly because the model simply trains for longer: a baseline that could still
learn gets better from the extra steps alone. The control separates the two. It is the
uncompressed baseline put through the variant's training stages, in order, with the same
settings:

- ``distill``: the baseline as its own student (``student: current``) distilled from the
  baseline teacher with the variant's steps, learning rate, sequence length, loss weights and
  temperature (a variant that trains a new, smaller student or learns from another variant
  gets this same control: the budget and the loss are what it matches);
- ``finetune``: the baseline fine-tuned on the same data with the same training settings.

Stages that do not train (pruning, quantization) are left out: the control is uncompressed.
A control is computed once per budget and cached (``controls/<key>`` in the cache), its files
checked against their sha256 digests when read back; the key covers the baseline (with its
steps when partial), the seed and the training stages' settings, and, for a stage that trains
on another corpus, that corpus's token ids. One process trains a control at a time: another
that needs the same one (a sweep's workers often do) waits for it and reads it from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from compress.cache import cache_dir, seal_dir, stable_hash, verify_dir
from compress.compressors import REGISTRY, StageReport
from compress.locks import exclusive
from compress.recipe import Stage
from compress.variant import load_variant, save_variant

log = logging.getLogger(__name__)

FORMAT = "control-v1"
TRAINING_STAGES: tuple[str, ...] = ("distill", "finetune")
REPORTS = "reports.json"


@dataclass
class Control:
    """A built or cached control: its cache key, the model and its stage reports."""

    key: str
    model: nn.Module
    reports: list[StageReport]
    cached: bool  # True when read from the cache, False when trained by this call
    path: Path


def control_stages(stages: list[Stage]) -> list[Stage]:
    """The training stages of ``stages`` (a variant's, from the baseline on), rewritten to train
    the uncompressed baseline the same way; empty when the variant does not train."""
    out = []
    for stage in stages:
        if stage.name not in TRAINING_STAGES:
            continue
        settings = stage.config.model_dump()
        settings["keep_sparsity"] = False  # the baseline has no pruned weights to keep
        if stage.name == "distill":
            settings.update(teacher="baseline", student="current")
        cls = REGISTRY[stage.name].config_cls
        out.append(Stage(stage.name, cls.model_validate(settings)))
    return out


def tokens_fingerprint(tokens: dict[str, torch.Tensor]) -> str:
    """sha256 of every split's token ids (for a corpus the baseline key does not cover)."""
    h = hashlib.sha256()
    for split in sorted(tokens):
        h.update(split.encode())
        h.update(tokens[split].to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def control_key(baseline: str, seed: int, stages: list[Stage], resolved: list[dict]) -> str:
    """The cache key of the control that trains the baseline ``baseline`` (its identity,
    :attr:`BaselineInfo.identity`) through ``stages``; ``resolved`` holds, per stage, what the
    settings leave to the run (finetune: the run's training settings, the data's tokens)."""
    return stable_hash(
        {
            "format": FORMAT,
            "baseline": baseline,
            "seed": seed,
            "stages": [
                {"name": s.name, "config": s.config.model_dump(mode="json"), "resolved": r}
                for s, r in zip(stages, resolved, strict=True)
            ],
        },
        length=24,
    )


def entry_path(key: str) -> Path:
    return cache_dir() / "controls" / key


@contextlib.contextmanager
def building_control(key: str) -> Iterator[None]:
    """Hold the right to build the control ``key`` (a lock on ``controls/.<key>.lock`` in the
    cache, :func:`compress.locks.exclusive`), waiting while another process holds it. Where no
    lock exists (no ``fcntl``), two processes may both train it; the cache keeps one whole
    entry."""

    def waiting() -> None:
        log.info("control %s is being trained by another process; waiting for it", key)

    with exclusive(entry_path(key).with_name(f".{key}.lock"), waiting):
        yield


def read_control(key: str) -> Control | None:
    """The cached control ``key``, or None when absent or damaged (a damaged entry is warned
    about and rebuilt)."""
    path = entry_path(key)
    if not (path / REPORTS).exists() or not verify_dir(path, "cached control"):
        return None
    try:
        model = load_variant(path)
        reports = [StageReport(**r) for r in json.loads((path / REPORTS).read_text())]
    except Exception as exc:
        log.warning("cached control at %s is unreadable (%s); training it again", path, exc)
        return None
    return Control(key, model, reports, True, path)


def write_control(key: str, model: nn.Module, reports: list[StageReport]) -> Path:
    """Cache the control: written to a temporary folder, sealed, then renamed into place (a
    kill leaves no half-written entry; another process's finished entry is kept)."""
    path = entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}-"))
    try:
        save_variant(model, tmp, extra={"control": key})
        (tmp / REPORTS).write_text(json.dumps([r.to_dict() for r in reports], indent=1))
        seal_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}-old-"))
            os.replace(path, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
