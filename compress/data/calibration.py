"""Calibration data: random windows of a tokenized split, for methods that read activations.

    calibration: {split: train, samples: 128, seq_len: 512, seed: 0}

Methods that fit compressed weights to the model's own activations (Wanda, SparseGPT, GPTQ)
run ``samples`` windows of ``seq_len`` tokens, drawn uniformly at random (with ``seed``) from
one split of the recipe's tokenized corpus, through the model. The setting lives at recipe
level; a stage may override any of its keys in its own settings (``calibration: {samples:
32}``). ``seq_len`` left out means the model's context length, at most 512.

The chosen windows are cached under a key of the corpus and tokenizer fingerprints and the
settings; what is read back is checked against the split's tokens before it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from compress.cache import cache_dir, stable_hash
from compress.errors import CompressError

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 512
_FORMAT = 1


class CalibrationSpec(BaseModel):
    """Which windows of which split calibrate a stage (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: Literal["train", "valid", "test"] = "train"
    samples: int = Field(128, ge=1, le=65536)
    seq_len: int | None = Field(None, ge=8, description="defaults to the context, at most 512")
    seed: int = 0


def merge(base: CalibrationSpec | None, override: CalibrationSpec | None) -> CalibrationSpec:
    """``base`` (the recipe's setting) with the keys ``override`` (a stage's) sets explicitly."""
    base = base or CalibrationSpec()
    if override is None:
        return base
    return base.model_copy(update=override.model_dump(include=override.model_fields_set))


def tokens_fingerprint(ids: torch.Tensor) -> str:
    """sha256 of a split's token ids (the key when no corpus/tokenizer fingerprint is given)."""
    data = ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:24]


def calibration_windows(
    tokens: dict[str, torch.Tensor],
    spec: CalibrationSpec,
    max_seq_len: int | None,
    fingerprint: str = "",
    stage: str = "stage",
) -> torch.Tensor:
    """``(samples, seq_len)`` token ids: random windows of ``tokens[spec.split]``.

    ``max_seq_len`` is the model's context length (None: unknown); ``fingerprint`` identifies
    the corpus and tokenizer that made ``tokens`` (hashed from the split itself when empty).
    Raises :class:`CompressError` naming the key when the split is missing or too short or the
    windows do not fit the model.
    """
    if spec.split not in tokens:
        have = ", ".join(sorted(tokens)) or "none"
        raise CompressError(
            f"{stage}.calibration.split: no tokenized {spec.split!r} split to calibrate on "
            f"(splits given: {have})"
        )
    ids = tokens[spec.split].reshape(-1)
    seq_len = resolve_seq_len(spec, max_seq_len, stage)
    if ids.numel() < seq_len + 1:
        raise CompressError(
            f"{stage}.calibration.seq_len: the {spec.split} split has {ids.numel()} tokens, "
            f"fewer than one window of {seq_len}"
        )
    key = stable_hash(
        [fingerprint or tokens_fingerprint(ids), ids.numel(), spec.model_dump(), seq_len, _FORMAT]
    )
    path = cache_dir() / "calibration" / f"{key}.safetensors"
    if path.is_file():
        starts = load_file(str(path)).get("starts")
        windows = _windows(ids, starts, seq_len) if _valid(starts, spec, ids, seq_len) else None
        if windows is not None:
            return windows
        log.warning("calibration cache %s does not match its split; drawing again", path)
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (spec.samples,), generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"starts": starts}, str(tmp))
    os.replace(tmp, path)
    return _windows(ids, starts, seq_len)


def resolve_seq_len(spec: CalibrationSpec, max_seq_len: int | None, stage: str = "stage") -> int:
    """The window length: ``spec.seq_len``, or the context length capped at 512."""
    if spec.seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, max_seq_len or DEFAULT_MAX_SEQ_LEN)
    if max_seq_len is not None and spec.seq_len > max_seq_len:
        raise CompressError(
            f"{stage}.calibration.seq_len = {spec.seq_len} exceeds the model's context length "
            f"{max_seq_len}"
        )
    return spec.seq_len


def _valid(starts: torch.Tensor | None, spec: CalibrationSpec, ids: torch.Tensor, n: int) -> bool:
    return (
        starts is not None
        and starts.dtype == torch.int64
        and starts.shape == (spec.samples,)
        and bool((starts >= 0).all())
        and bool((starts <= ids.numel() - n).all())
    )


def _windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    offsets = torch.arange(seq_len)
    return ids[starts.unsqueeze(1) + offsets.unsqueeze(0)].clone()  # (samples, seq_len)
