"""Corpora, tokenizers and token-id tensors for training and evaluating language models."""

from __future__ import annotations

from compress.data.corpus import Corpus, builtin_corpus, files_corpus, hf_corpus
from compress.data.tokenizer import Tokenizer, encode_splits, train_tokenizer, unigram_perplexity

__all__ = [
    "Corpus",
    "Tokenizer",
    "builtin_corpus",
    "encode_splits",
    "files_corpus",
    "hf_corpus",
    "train_tokenizer",
    "unigram_perplexity",
]
