"""Content-addressed cache for artifacts that are expensive to rebuild (tokenizers, baselines)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "COMPRESS_CACHE_DIR"


def cache_dir() -> Path:
    """Root of the cache: ``$COMPRESS_CACHE_DIR`` or ``~/.cache/compress``."""
    root = os.environ.get(ENV_VAR)
    path = Path(root) if root else Path.home() / ".cache" / "compress"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON form of ``obj`` (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
