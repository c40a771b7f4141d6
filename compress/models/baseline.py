"""The built-in baseline: trained on first use, then loaded from the cache.

The cache key covers everything that determines the trained weights: model config, corpus
fingerprint, tokenizer fingerprint, training settings and seed, and the checkpoint format.
Change any of them and a new baseline is trained; change nothing and it is loaded in well
under a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.cache import cache_dir, stable_hash
from compress.models.gpt import GPT, GPTConfig
from compress.train import TrainConfig, TrainReport, train
from compress.variant import load_variant, save_variant

log = logging.getLogger(__name__)

FORMAT = "baseline-v1"


@dataclass
class BaselineInfo:
    key: str
    path: Path
    cached: bool  # True when loaded from the cache, False when trained by this call
    train: dict  # the TrainReport of the run that produced it (as stored)


def baseline_key(cfg: GPTConfig, corpus_fp: str, tokenizer_fp: str, train_cfg: TrainConfig) -> str:
    return stable_hash(
        {
            "format": FORMAT,
            "model": cfg.to_dict(),
            "corpus": corpus_fp,
            "tokenizer": tokenizer_fp,
            "train": train_cfg.__dict__,
        }
    )


def get_baseline(
    cfg: GPTConfig,
    tokens: dict[str, torch.Tensor],
    corpus_fp: str,
    tokenizer_fp: str,
    train_cfg: TrainConfig,
    progress: bool = True,
) -> tuple[GPT, BaselineInfo]:
    """Load the cached baseline for these inputs, or train it and cache it."""
    key = baseline_key(cfg, corpus_fp, tokenizer_fp, train_cfg)
    path = cache_dir() / "baselines" / key
    if (path / "train.json").exists():
        try:
            model = load_variant(path)
            report = json.loads((path / "train.json").read_text())
            log.info("baseline %s loaded from %s", key, path)
            return model, BaselineInfo(key, path, True, report)
        except Exception as exc:  # a damaged cache entry is rebuilt, not fatal
            log.warning("cached baseline at %s is unreadable (%s); retraining", path, exc)
    torch.manual_seed(train_cfg.seed)
    model = GPT(cfg)
    report: TrainReport = train(
        model,
        tokens["train"],
        train_cfg,
        val_ids=tokens["valid"],
        desc="train baseline",
        progress=progress,
    )
    # Write to a temporary folder and rename, so a crash never leaves a half-written entry.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}-"))
    save_variant(model, tmp)
    (tmp / "train.json").write_text(json.dumps(report.to_dict(), indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return model.eval(), BaselineInfo(key, path, False, report.to_dict())
