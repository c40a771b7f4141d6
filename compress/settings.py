"""Settings models the recipe and the stages share: where text comes from, how to train.

The recipe's top-level ``data`` and ``train`` sections are these models, and a stage that trains
on another corpus (``finetune``) nests the same two, so each setting is declared once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    corpus: Literal["builtin", "files", "hf"] = "builtin"
    # For ``files``: a list of paths/globs split contiguously by ``fractions``, or a mapping
    # {train: [...], valid: [...], test: [...]}. Relative paths are read from the recipe's folder.
    files: list[str] | dict[str, list[str]] | None = None
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    # For ``hf``: a dataset through the `datasets` library (needs a network unless cached),
    # e.g. path: wikitext, name: wikitext-2-raw-v1; rows of `text_field` joined by blank lines.
    path: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    text_field: str = Field("text", min_length=1)
    splits: dict[Literal["train", "valid", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "valid": "validation", "test": "test"}
    )
    # The built-in GPT's tokenizer (byte-level BPE trained on the train split); a Hugging Face
    # model brings its own.
    vocab_size: int = Field(4096, ge=257, le=65536)

    @model_validator(mode="after")
    def _source_fields(self) -> DataSpec:
        if self.corpus == "files" and not self.files:
            raise ValueError("corpus 'files' needs a non-empty 'files' list or mapping")
        if self.corpus != "files" and self.files:
            raise ValueError("'files' is only read when corpus is 'files'")
        if self.corpus == "hf" and not self.path:
            raise ValueError("corpus 'hf' needs 'path' (a dataset name, e.g. wikitext)")
        hf_only = {"path", "name", "text_field", "splits"} & self.model_fields_set
        if self.corpus != "hf" and hf_only:
            raise ValueError(f"{', '.join(sorted(hf_only))}: only read when corpus is 'hf'")
        return self


class TrainSpec(Strict):
    # The step count decides the baseline: the default trains the `small` baseline in about
    # 5 minutes on 2 idle CPU cores, longer on a busy machine. An optional time cap stops it
    # early; the baseline is then cached as partial and resumed by the next run (see partial).
    max_steps: int = Field(700, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=8)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    bf16: bool = False
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    early_stop_patience: int | None = Field(None, ge=1)
    # A checkpoint of the baseline's training every this many steps: Ctrl-C or the time cap
    # loses at most this many. A baseline stopped early is cached as partial and resumed by the
    # next run ("resume"), or used as it is ("accept"); reports mark it partial either way.
    checkpoint_every: int = Field(100, ge=1)
    partial: Literal["resume", "accept"] = "resume"
