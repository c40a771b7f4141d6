"""What a sweep tells the terminal: one line per finished trial, at most 80 columns."""

from __future__ import annotations

from collections.abc import Callable

from optuna.trial import FrozenTrial, TrialState

from compress.sweep.space import SweepSpec

Echo = Callable[[str], None]

WIDTH = 80


def _cut(text: str, room: int) -> str:
    """`text` in at most `room` characters (at least a few), cut with ``..``."""
    room = max(room, 12)
    return text if len(text) <= room else text[: room - 2].rstrip() + ".."


def trial_line(
    trial: FrozenTrial, spec: SweepSpec, worker: str, done: int, width: int = WIDTH
) -> str:
    """The terminal line for a finished trial; `done` is the study's completed trials.

    ``[4/20] trial 4 (host:123) ppl 42.31 (1.004x) lat 0.512x noisy size 0.262x 9.1 s |
    prune(sparsity=0.5) -> int8``: the numbers first, then what the trial built, cut to fit
    `width`; ``noisy`` marks a latency ratio whose interval stayed wider than asked (the
    report and the dashboard have the whole record).
    """
    a = trial.user_attrs
    shown = worker if len(worker) <= 20 else ".." + worker[-18:]  # the pid stays
    head = f"[{done}/{spec.trials}] trial {trial.number} ({shown})"
    what = a.get("stages") or "baseline"
    if a.get("seed"):
        what = f"{a['seed']}: {what}"
    if trial.state == TrialState.PRUNED:
        return _cut(f"{head} skipped {what}: {a.get('error', 'pruned')}", width)
    if trial.state != TrialState.COMPLETE:
        return _cut(f"{head} FAILED: {a.get('error', trial.state.name)} | {what}", width)
    parts: list[tuple[str, str]] = []  # (what it is, text)
    for key, fmt in (
        ("perplexity", "ppl {}"),
        ("perplexity_ratio", "({:.3f}x)"),
        ("latency_ratio", "lat {:.3f}x"),
        ("weight_bytes_ratio", "size {:.3f}x"),
        ("seconds", "{:.1f} s"),
    ):
        value = a.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append((key, fmt.format(_num(value) if key == "perplexity" else value)))
            if key == "latency_ratio" and a.get("latency_noisy"):
                parts.append(("noisy", "noisy"))
    if a.get("cached_from"):
        parts.append(("cached_from", f"(reused from {a['cached_from']})"))
    # what goes first when the line is too long: the least telling
    for drop in ("cached_from", "perplexity_ratio", "seconds"):
        if len(f"{head} {' '.join(t for _, t in parts)} | ") + 12 <= width:
            break
        parts = [(k, t) for k, t in parts if k != drop]
    line = f"{head} {' '.join(t for _, t in parts)}"
    return _cut(f"{line} | {_cut(what, width - len(line) - 3)}", width)


def _num(v: float) -> str:
    a = abs(v)
    return f"{v:.{0 if a >= 1000 else 1 if a >= 100 else 2}f}"
