"""Measurements: perplexity, latency and memory, as defined in :data:`DEFINITIONS`."""

from __future__ import annotations

from compress.metrics import definitions

# Written into every report, so a reader knows exactly what each number is.
DEFINITIONS: dict[str, str] = {
    **definitions(),
    "unigram perplexity": (
        "perplexity of a unigram model (token frequencies of the training split, add-one "
        "smoothed over the vocabulary) on the same held-out tokens: the floor any language model "
        "should beat by a wide margin."
    ),
}
