"""Checks of a run's inputs that need more than the recipe, made before any long work starts.

- :func:`check_output` (before anything else): the report folder can be created and written,
  and an explicitly given SQLite storage file has an existing folder.
- :func:`check_tokens` (once the corpus is encoded, before the baseline trains): every split
  is long enough for what the recipe does with it (a training batch, an evaluation window).

Each problem is a :class:`~compress.errors.CompressError` naming the path or the key.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from compress.errors import CompressError
from compress.recipe import stage_seq_lens
from compress.storage import mask_url

if TYPE_CHECKING:
    import torch

    from compress.recipe import Recipe


def check_output(out_dir: Path, storage: str | None = None) -> None:
    """The report folder ``out_dir`` (existing or not) must be writable, and ``storage`` (an
    SQLAlchemy URL the user gave), when it is an SQLite file, must be in an existing folder."""
    check_writable_dir(Path(out_dir), "report folder")
    if storage:
        check_sqlite_storage(storage)


def check_writable_dir(path: Path, what: str) -> None:
    """``path`` is a folder, or can be made one, where this process can create files."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise CompressError(f"{what} {path} is a file, not a folder")
        raise CompressError(f"{what} {path}: {existing} is a file, not a folder")
    try:  # a real write, not os.access: that says yes to root on a read-only folder
        with tempfile.TemporaryFile(dir=existing, prefix=".compress-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = "" if existing == path else f" (it would be made in {existing})"
        raise CompressError(f"{what} {path} is not writable{where}: {reason}") from None


def check_sqlite_storage(url: str) -> None:
    """An SQLite URL's database file must be in an existing, writable folder (a missing
    folder is far more often a typo than a wish to create it)."""
    url = os.path.expandvars(url)  # as the sweep runner reads it
    if not url.startswith("sqlite"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except ArgumentError:
        raise CompressError(f"storage {mask_url(url)}: not a valid SQLAlchemy URL") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = Path(database).expanduser().parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise CompressError(
            f"storage {mask_url(url)}: the SQLite file's folder {folder} {state}; "
            "create it or fix the path"
        )
    check_writable_dir(folder, "storage folder")


def check_tokens(recipe: Recipe, tokens: dict[str, torch.Tensor], trains_baseline: bool) -> None:
    """Every split holds enough tokens for what the recipe does with it: one training batch
    window (``seq_len + 2`` tokens) of the train and valid splits for the baseline (when it is
    trained) and for each distillation stage; one evaluation window for perplexity."""
    needs: list[tuple[str, str, int]] = []  # (split, key of the setting, tokens needed)
    if trains_baseline:
        for split in ("train", "valid"):
            needs.append((split, "train.seq_len", recipe.train.seq_len + 2))
    for key, n in stage_seq_lens(recipe):
        for split in ("train", "valid"):
            needs.append((split, key, n + 2))
    ppl = recipe.eval.perplexity
    n_eval = tokens[ppl.split].numel()
    if ppl.max_tokens is not None and ppl.max_tokens < n_eval:
        if ppl.max_tokens < ppl.seq_len:
            raise CompressError(
                f"eval.perplexity.max_tokens = {ppl.max_tokens} is shorter than one evaluation "
                f"window (eval.perplexity.seq_len = {ppl.seq_len})"
            )
    else:
        needs.append((ppl.split, "eval.perplexity.seq_len", ppl.seq_len))
    for split, key, need in needs:
        have = tokens[split].numel()
        if have < need:
            raise CompressError(
                f"data: the {split} split has {have:,} tokens, too few for {key} "
                f"(needs at least {need:,}); give more text or a shorter seq_len"
            )
