"""The baseline every variant starts from.

The built-in GPT is trained on first use, then loaded from the cache. Its cache key covers
everything that determines the trained weights: model config, corpus fingerprint, tokenizer
fingerprint, training settings and seed, and the checkpoint format. Change any of them and a
new baseline is trained; change nothing and it is loaded in well under a second, after its
files are checked against the sha256 digests written with them (a damaged entry is retrained).

The key leaves out what only decides *when* training happens (the time cap ``max_minutes``,
``checkpoint_every``): the weights a key names are those of ``max_steps`` steps, whatever the
machine's speed. Training hands a resumable checkpoint to the cache entry every
``checkpoint_every`` steps; when the time cap (or Ctrl-C) stops it early the entry is marked
partial, and the next run resumes it to ``max_steps`` (``partial="resume"``) or uses it as it
is (``partial="accept"``). A partial baseline always says so (:attr:`BaselineInfo.partial`).

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
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn

from compress.cache import cache_dir, seal_dir, stable_hash, verify_dir
from compress.data import Tokenizer
from compress.models.gpt import GPT, PRESETS, GPTConfig
from compress.train import TrainConfig, TrainReport, TrainState, train

if TYPE_CHECKING:
    from compress.recipe import ModelSpec
from compress.variant import load_variant, save_variant

log = logging.getLogger(__name__)

FORMAT = "baseline-v2"
STATE_DIR = "state"  # a partial entry's optimizer and random-generator states
# Training settings that decide when training happens, not which weights it ends with.
_NOT_IN_KEY = frozenset({"max_minutes", "checkpoint_every"})
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

    @property
    def partial(self) -> bool:
        """True when training stopped before its planned steps (the time cap, an interruption)."""
        return bool(self.train and self.train.get("partial"))

    @property
    def identity(self) -> str:
        """The key, plus the steps done when the baseline is partial: the key names the weights
        of ``max_steps`` steps, so a partial entry and the same entry resumed to completion
        share it although their weights differ. What compares against a baseline (a sweep's
        study and result cache, a control) records this instead."""
        if not self.partial:
            return self.key
        tr = self.train or {}
        return f"{self.key}@partial-{tr.get('steps', 0)}-of-{tr.get('planned_steps', '?')}"

    def steps_text(self) -> str:
        """``partial: 115 of 700 steps`` (or ``700 of 700 steps``)."""
        tr = self.train or {}
        done = f"{tr.get('steps', 0)} of {tr.get('planned_steps', '?')} steps"
        return f"partial: {done}" if self.partial else done

    def headline(self) -> str:
        """One line for the terminal: what the baseline is and how this run got it."""
        if self.train is None:
            how = f"loaded from {self.path}"
        elif self.cached:
            how = f"loaded from cache ({self.path})"
        else:
            how = f"trained in {self.train['seconds']:.0f} s ({self.path})"
        line = f"baseline {self.description}: {how}"
        if self.partial:
            line += f"; PARTIAL: {self.steps_text()[9:]} (stopped by {self.train['stopped_by']})"
        return line

    def partial_warning(self, perplexity: float | None) -> str | None:
        """The loud multi-line notice for a partial baseline, None for a complete one."""
        if not self.partial:
            return None
        tr = self.train or {}
        ppl = "-" if perplexity is None else f"{perplexity:.2f}"
        return (
            f"WARNING: the baseline is PARTIAL ({self.steps_text()[9:]}, stopped by "
            f"{tr.get('stopped_by')}, perplexity {ppl}).\n"
            "Every number of this run compares against an undertrained model.\n"
            "Run again to resume training to train.max_steps, or set train.partial: accept "
            "to use it as it is."
        )


def baseline_key(cfg: GPTConfig, corpus_fp: str, tokenizer_fp: str, train_cfg: TrainConfig) -> str:
    return stable_hash(
        {
            "format": FORMAT,
            "model": cfg.to_dict(),
            "corpus": corpus_fp,
            "tokenizer": tokenizer_fp,
            "train": {k: v for k, v in train_cfg.__dict__.items() if k not in _NOT_IN_KEY},
        }
    )


def get_baseline(
    cfg: GPTConfig,
    tokens: dict[str, torch.Tensor],
    corpus_fp: str,
    tokenizer_fp: str,
    train_cfg: TrainConfig,
    progress: bool = True,
    partial: Literal["resume", "accept"] = "resume",
    stop_at: int | None = None,
) -> tuple[GPT, BaselineInfo]:
    """Load the cached baseline for these inputs, or train it and cache it.

    A partial entry is resumed to ``max_steps`` (``partial="resume"``) or used as it is
    (``"accept"``). ``stop_at`` stops this call's training once that step is done, leaving a
    partial entry, as the time cap would (for tests and benchmarks: no wall clock involved).
    """
    key = baseline_key(cfg, corpus_fp, tokenizer_fp, train_cfg)
    path = cache_dir() / "baselines" / key
    desc = _describe(cfg)
    model, report, state = _read_entry(path)
    if model is not None and report is not None:
        info = BaselineInfo(key, path, True, report, desc)
        if not info.partial or partial == "accept":
            log.info("baseline %s loaded from %s (%s)", key, path, info.steps_text())
            return model, info
        if state is None:
            log.warning("partial baseline at %s has no training state; retraining", path)
            model = None
        else:
            log.info("resuming the partial baseline at %s (%s)", path, info.steps_text())
    if model is None or state is None:
        torch.manual_seed(train_cfg.seed)
        model, state = GPT(cfg), None
    # every step's record, for training curves; a resumed run continues the stored one
    curve: list[dict] = list((report or {}).get("curve") or []) if state is not None else []

    def keep(m: nn.Module, s: TrainState, r: TrainReport) -> None:
        _write_entry(path, m, {**r.to_dict(), "curve": curve}, s)

    result: TrainReport = train(
        model,
        tokens["train"],
        train_cfg,
        val_ids=tokens["valid"],
        desc="train baseline",
        progress=progress,
        resume=state,
        on_checkpoint=keep,
        stop_at=stop_at,
        on_log=curve.append,
    )
    stored = {**result.to_dict(), "curve": curve}
    if not result.partial:  # a partial run's entry was written by its last checkpoint
        _write_entry(path, model, stored, None)
    return model.eval(), BaselineInfo(key, path, False, stored, desc)


def _read_entry(path: Path) -> tuple[GPT | None, dict | None, TrainState | None]:
    """The cached model, its training report and (partial entries) its training state; Nones
    when there is no readable entry (a damaged one is rebuilt, not fatal)."""
    if not (path / "train.json").exists() or not verify_dir(path, "cached baseline"):
        return None, None, None
    try:
        model = load_variant(path)
        report = json.loads((path / "train.json").read_text())
        state = TrainState.load(path / STATE_DIR) if report.get("partial") else None
    except Exception as exc:
        log.warning("cached baseline at %s is unreadable (%s); retraining", path, exc)
        return None, None, None
    return model, report, state


def _write_entry(path: Path, model: nn.Module, report: dict, state: TrainState | None) -> None:
    """Write the entry to a temporary folder and swap it in, so a crash never leaves a
    half-written entry (at worst the previous checkpoint is lost, and training restarts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    save_variant(model, tmp)
    if state is not None:
        state.save(tmp / STATE_DIR)
    (tmp / "train.json").write_text(json.dumps(report, indent=2))
    seal_dir(tmp)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
        os.replace(path, old / "entry")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
