"""Byte-level BPE tokenizers trained on a corpus, token-id tensors, and a unigram baseline.

Everything expensive is cached under :func:`compress.cache.cache_dir`, keyed by content
fingerprints: trained tokenizers in ``tokenizers/`` (tokenizers JSON) and encoded splits in
``tokens/`` (safetensors), each with its sha256 beside it, checked when read back.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from compress.cache import cache_dir, read_entry, stable_hash, write_entry
from compress.data.corpus import SPLITS, Corpus
from compress.errors import CompressError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols plus the end-of-text token.
MIN_VOCAB_SIZE = 257
# Bump when training settings change, so stale cached tokenizers/tokens are not reused.
_FORMAT = 1
# Target characters per chunk when encoding long text with encode_batch.
_CHUNK_CHARS = 16_384
# A newline between two printable ASCII non-space characters is always a boundary of the
# byte-level pre-tokenizer's regex, and the regex pieces on either side do not depend on the
# other side, so cutting there gives exactly the tokens of the whole text.
_SAFE_CUT = re.compile(r"(?<=[!-~])\n(?=[!-~])")


def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Consecutive pieces of ``text`` (about ``size`` characters) cut only at safe newlines."""
    n = len(text)
    start = 0
    while start < n:
        m = _SAFE_CUT.search(text, start + size) if start + size < n else None
        end = m.end() if m else n
        yield text[start:end]
        start = end


class Tokenizer:
    """A trained byte-level BPE tokenizer (a thin wrapper over Hugging Face ``tokenizers``)."""

    def __init__(
        self, backend: _HFTokenizer, eos_token: str | None = EOS_TOKEN, chunked: bool = True
    ) -> None:
        """``backend``: a trained ``tokenizers.Tokenizer``; ``eos_token``: its end-of-text token
        (a model's own tokenizer may have none); ``chunked``: encode long text in parallel
        chunks cut at newlines, exact only for the byte-level BPE that :func:`train_tokenizer`
        makes (other pre-tokenizers may treat a chunk's start differently)."""
        eos = backend.token_to_id(eos_token) if eos_token is not None else None
        if eos_token is not None and eos is None:
            raise CompressError(f"tokenizer has no {eos_token!r} special token")
        self._backend = backend
        self._chunked = chunked
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.fingerprint: str = stable_hash(backend.to_str())
        self.eos_id: int | None = eos

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added). Long text is encoded in parallel
        chunks; the result equals encoding it in one call."""
        if len(text) <= _CHUNK_CHARS or not self._chunked:
            return self._backend.encode(text, add_special_tokens=False).ids
        encodings = self._backend.encode_batch(list(_chunks(text)), add_special_tokens=False)
        return list(chain.from_iterable(e.ids for e in encodings))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are kept, so ``decode(encode(s)) == s``."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        """Write the tokenizer as a ``tokenizers`` JSON file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._backend.save(str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Read a tokenizer saved by :meth:`save` (or any ``tokenizers`` JSON file with an
        ``<|endoftext|>`` token)."""
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"tokenizer file {path} does not exist")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise CompressError(f"{path}: not a valid tokenizers JSON file: {exc}") from exc
        try:
            return cls(backend)
        except CompressError as exc:
            raise CompressError(f"{path}: {exc}") from exc


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise CompressError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise CompressError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), "
            f"got {vocab_size}"
        )


def _train(text: str, vocab_size: int) -> _HFTokenizer:
    """Train a byte-level BPE on ``text``; deterministic for the same inputs."""
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chunks are cut at pre-token boundaries, so the word counts equal those of the whole text.
    backend.train_from_iterator(_chunks(text), trainer=trainer)
    return backend


def tokenizer_cache_path(corpus: Corpus, vocab_size: int) -> Path:
    """Where :func:`train_tokenizer` caches the tokenizer for ``corpus`` and ``vocab_size``."""
    key = stable_hash([corpus.fingerprint, vocab_size, _FORMAT])
    return cache_dir() / "tokenizers" / f"{key}.json"


def train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` entries (incl. ``<|endoftext|>``) trained on
    ``corpus.train`` only; loaded from the cache when trained before."""
    _check_vocab_size(vocab_size)
    path = tokenizer_cache_path(corpus, vocab_size)
    data = read_entry(path, "cached tokenizer")
    if data is not None:
        try:
            tok = Tokenizer(_HFTokenizer.from_str(data.decode("utf-8")))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            logger.warning("cache: ignoring unreadable cached tokenizer %s: %s", path, exc)
        else:
            logger.info("tokenizer: loaded from cache %s (vocab %d)", path, tok.vocab_size)
            return tok

    t0 = time.perf_counter()
    tok = Tokenizer(_train(corpus.train, vocab_size))
    write_entry(path, tok.backend.to_str(pretty=True).encode("utf-8"))
    logger.info(
        "tokenizer: trained vocab %d (asked %d) on %s train split in %.2fs, cached at %s",
        tok.vocab_size,
        vocab_size,
        corpus.name,
        time.perf_counter() - t0,
        path,
    )
    if tok.vocab_size < vocab_size:
        logger.warning(
            "tokenizer: train split too small for vocab_size %d; got %d",
            vocab_size,
            tok.vocab_size,
        )
    return tok


def tokens_cache_path(tokenizer: Tokenizer, corpus: Corpus) -> Path:
    """Where :func:`encode_splits` caches the token ids of ``corpus`` under ``tokenizer``."""
    key = stable_hash([tokenizer.fingerprint, corpus.fingerprint, _FORMAT])
    return cache_dir() / "tokens" / f"{key}.safetensors"


def encode_splits(tokenizer: Tokenizer, corpus: Corpus) -> dict[str, torch.Tensor]:
    """``{"train", "valid", "test"}`` -> 1-D ``torch.long`` token ids of each split (cached)."""
    path = tokens_cache_path(tokenizer, corpus)
    data = read_entry(path, "cached tokens")
    if data is not None:
        try:
            tensors = load_tensors(data)
        except Exception as exc:  # safetensors raises its own error types
            logger.warning("cache: ignoring unreadable cached tokens %s: %s", path, exc)
        else:
            if set(tensors) == set(SPLITS):
                logger.info("tokens: loaded from cache %s", path)
                return {s: tensors[s] for s in SPLITS}
            logger.warning(
                "cache: ignoring cached tokens %s: unexpected keys %s", path, sorted(tensors)
            )

    t0 = time.perf_counter()
    out = {s: torch.tensor(tokenizer.encode(corpus.split(s)), dtype=torch.long) for s in SPLITS}
    write_entry(path, save_tensors(out))
    logger.info(
        "tokens: encoded %s in %.2fs (%s), cached at %s",
        corpus.name,
        time.perf_counter() - t0,
        ", ".join(f"{s} {out[s].numel():,}" for s in SPLITS),
        path,
    )
    return out


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of a unigram model fit on ``train_ids`` with add-one
    (Laplace) smoothing over ``vocab_size`` tokens: ``exp(mean(-log p(token)))``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise CompressError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    train = torch.as_tensor(train_ids).reshape(-1).long()
    evals = torch.as_tensor(eval_ids).reshape(-1).long()
    if evals.numel() == 0:
        raise CompressError("unigram_perplexity: eval_ids is empty")
    for name, ids in (("train_ids", train), ("eval_ids", evals)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise CompressError(
                f"unigram_perplexity: {name} must lie in [0, {vocab_size}), "
                f"got range [{int(ids.min())}, {int(ids.max())}]"
            )
    counts = torch.bincount(train, minlength=vocab_size).double()
    log_p = torch.log(counts + 1.0) - torch.log(
        torch.tensor(train.numel() + vocab_size, dtype=torch.float64)
    )
    return float(torch.exp(-log_p[evals].mean()))
