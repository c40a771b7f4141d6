"""Greedy continuations side by side: for a few prompts, the reference text, the baseline's
continuation and every variant's, so a reader sees what the BLEU/chrF numbers mean."""

from __future__ import annotations

import html
from collections.abc import Sequence

_CELL = 'style="white-space: pre-wrap; text-align: left; min-width: 16em; max-width: 40em"'


def continuations_html(
    prompts: Sequence[str],
    references: Sequence[str],
    columns: Sequence[tuple[str, Sequence[str]]],
    limit: int = 3,
) -> str:
    """One table per prompt (the first ``limit``): the prompt, then the reference text and each
    ``(name, continuations)`` column's continuation of it, side by side. Text is escaped."""
    esc = html.escape
    parts = []
    for i, prompt in enumerate(prompts[:limit]):
        heads = ["reference text", *(name for name, _ in columns)]
        texts = [references[i], *(texts[i] for _, texts in columns)]
        head = "".join(f'<th class="text">{esc(h)}</th>' for h in heads)
        cells = "".join(f"<td {_CELL}>{esc(t)}</td>" for t in texts)
        parts.append(
            f'<h3>Prompt {i + 1}</h3><p {_CELL}>&hellip;{esc(prompt)}</p><div class="scroll">'
            f"<table><thead><tr>{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table></div>"
        )
    return "".join(parts)
