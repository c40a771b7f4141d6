"""The ``scan:`` section of a recipe: what the per-layer sensitivity scan measures.

    scan:
      split: valid          # perplexity on a small slice of this split ...
      tokens: 8192          # ... its first `tokens` tokens
      prune: {method: magnitude, sparsities: [0.3, 0.5, 0.7]}
      quantize: {bits: [8, 4], group_size: 128}     # round-to-nearest, simulated
      ignore: [lm_head]

Every setting is applied to one linear layer at a time, the rest of the model untouched.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from compress.settings import Strict


class ScanPruneSpec(Strict):
    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    sparsities: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7], min_length=1)

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, values: list[float]) -> list[float]:
        for v in values:
            if not 0.0 < v < 1.0:
                raise ValueError(f"each sparsity must be in (0, 1), got {v}")
        if len(set(values)) != len(values):
            raise ValueError(f"sparsities must be distinct, got {values}")
        return sorted(values)


class ScanQuantSpec(Strict):
    """Round-to-nearest weights (min-max grid per group of input columns), simulated in
    float32: what rounding alone costs, labelled ``(simulated)`` in every output."""

    bits: list[int] = Field(default_factory=lambda: [8, 4], min_length=1)
    group_size: int | None = Field(128, ge=8, description="null: one group per output row")

    @field_validator("bits")
    @classmethod
    def _bits(cls, values: list[int]) -> list[int]:
        for v in values:
            if not 2 <= v <= 8:
                raise ValueError(f"each bit width must be in [2, 8], got {v}")
        if len(set(values)) != len(values):
            raise ValueError(f"bit widths must be distinct, got {values}")
        return sorted(values, reverse=True)


class ScanSpec(Strict):
    split: Literal["train", "valid", "test"] = "valid"
    tokens: int = Field(8192, ge=64, description="tokens of the split each perplexity reads")
    seq_len: int | None = Field(None, ge=8, description="defaults to eval.perplexity.seq_len")
    batch_size: int = Field(8, ge=1)
    prune: ScanPruneSpec | None = ScanPruneSpec()
    quantize: ScanQuantSpec | None = ScanQuantSpec()
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @model_validator(mode="after")
    def _something(self) -> ScanSpec:
        if self.prune is None and self.quantize is None:
            raise ValueError("prune and quantize are both off: the scan would measure nothing")
        return self
