"""Signs that a run's numbers mean little, said in one line each: the terminal shows them as
warnings and the report lists them under "Notes".

- :func:`binary_signs`: a corpus file (or split) that looks binary rather than text: NUL
  bytes, many control bytes, bytes that are not UTF-8.
- :func:`baseline_note`: a baseline whose perplexity is no better than a unigram model's on
  the same tokens (unigram fit on the train split's token counts, add-one smoothing), i.e. a
  model that learned nothing beyond token frequencies.
"""

from __future__ import annotations

import math

# Control bytes that plain text does not hold (tab, newline, vertical tab, form feed and
# carriage return are text).
_CONTROL = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
_REPLACEMENT = "\ufffd"
MAX_CONTROL_RATIO = 0.01  # text with more control bytes than this looks binary


def binary_signs(data: bytes | str) -> str | None:
    """Why ``data`` (a file's bytes, or decoded text) looks binary, or None when it looks
    like text: any NUL byte, over 1% control bytes, any bytes that are not UTF-8 (in decoded
    text: U+FFFD replacement characters)."""
    if isinstance(data, str):
        undecodable = data.count(_REPLACEMENT)
        raw = data.encode("utf-8", errors="surrogatepass")
    else:
        raw = data
        try:
            raw.decode("utf-8")
            undecodable = 0
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            undecodable = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
    if not raw:
        return None
    nul = raw.count(0)
    control = len(raw) - len(raw.translate(None, _CONTROL))
    signs = []
    if nul:
        signs.append(f"{nul:,} NUL bytes")
    if control / len(raw) > MAX_CONTROL_RATIO:
        signs.append(f"{control / len(raw):.0%} control bytes")
    if undecodable:
        signs.append(f"{undecodable:,} bytes that are not UTF-8")
    return ", ".join(signs) or None


def baseline_note(ppl: float | None, unigram: float, split: str) -> str | None:
    """A note when the baseline's perplexity on ``split`` is no better than the unigram
    model's on the same tokens; None when it is better (or was not measured)."""
    if ppl is None or not math.isfinite(unigram) or (math.isfinite(ppl) and ppl < unigram):
        return None
    return (
        f"the baseline's {split} perplexity {ppl:.2f} is no better than a unigram model's "
        f"{unigram:.2f} on the same tokens (token frequencies of the train split, add-one "
        "smoothing): it has learned next to nothing, so the variants' ratios to it say little"
    )
