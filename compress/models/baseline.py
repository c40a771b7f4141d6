"""The baseline every variant starts from.

The built-in GPT is trained on first use, then loaded from the cache. Its cache key covers
everything that determines the trained weights: model config, corpus fingerprint, tokenizer
fingerprint, training settings and seed, and the checkpoint format. Change any of them and a
new baseline is trained; change nothing and it is loaded in well under a second.

A Hugging Face model is loaded as it is (``from_pretrained``); its key is the model id and the
resolved revision (or the directory's content hash) and the dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from compress.cache import cache_dir, stable_hash
from compress.data import Tokenizer
from compress.models.gpt import GPT, PRESETS, GPTConfig
from compress.train import TrainConfig, TrainReport, train

if TYPE_CHECKING:
    from compress.recipe import ModelSpec
from compress.variant import load_variant, save_variant

log = logging.getLogger(__name__)

FORMAT = "baseline-v1"
HF_FORMAT = "hf-baseline-v1"


@dataclass
class BaselineInfo:
    key: str
    path: Path | str  # the cache entry, the model's directory, or its hub id
    cached: bool  # True when loaded (cache, directory, hub), False when trained by this call
    # the built-in GPT's TrainReport as stored, with "curve": every step's record (an entry
    # cached before curves were kept has none); None for a loaded model
    train: dict | None
    description: str = "built-in GPT"

    def headline(self) -> str:
        """One line for the terminal: what the baseline is and how this run got it."""
        if self.train is None:
            how = f"loaded from {self.path}"
        elif self.cached:
            how = f"loaded from cache ({self.path})"
        else:
            how = f"trained in {self.train['seconds']:.0f} s ({self.path})"
        return f"baseline {self.description}: {how}"


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
            return model, BaselineInfo(key, path, True, report, _describe(cfg))
        except Exception as exc:  # a damaged cache entry is rebuilt, not fatal
            log.warning("cached baseline at %s is unreadable (%s); retraining", path, exc)
    torch.manual_seed(train_cfg.seed)
    model = GPT(cfg)
    curve: list[dict] = []
    report: TrainReport = train(
        model,
        tokens["train"],
        train_cfg,
        val_ids=tokens["valid"],
        desc="train baseline",
        progress=progress,
        on_log=curve.append,
    )
    stored = {**report.to_dict(), "curve": curve}
    # Write to a temporary folder and rename, so a crash never leaves a half-written entry.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}-"))
    save_variant(model, tmp)
    (tmp / "train.json").write_text(json.dumps(stored, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return model.eval(), BaselineInfo(key, path, False, stored, _describe(cfg))


def _describe(cfg: GPTConfig) -> str:
    preset = next(
        (n for n, p in PRESETS.items() if all(cfg.to_dict()[k] == v for k, v in p.items())), None
    )
    return f"built-in GPT '{preset}'" if preset else "built-in GPT"


def load_hf_baseline(spec: ModelSpec, base_dir: Path) -> tuple[nn.Module, BaselineInfo, Tokenizer]:
    """The Hugging Face model ``spec.hf`` and its own tokenizer, as a baseline."""
    from compress.models.hf import load_pretrained, load_tokenizer

    model, src = load_pretrained(
        spec.hf, base_dir, spec.revision, spec.dtype, spec.trust_remote_code
    )
    tokenizer = load_tokenizer(src["source"], src["local"], src["revision"], spec.trust_remote_code)
    key = stable_hash({"format": HF_FORMAT, "model": src["fingerprint"], "dtype": spec.dtype})
    desc = f"{model.config.model_type} '{spec.hf}' ({spec.dtype})"
    return model, BaselineInfo(key, src["source"], True, None, desc), tokenizer
