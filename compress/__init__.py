"""compress: a model-compression workbench for GPT-style language models."""

from __future__ import annotations

__version__ = "0.1.0"
