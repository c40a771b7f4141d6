"""What a sweep tells the terminal: one line per finished trial."""

from __future__ import annotations

from collections.abc import Callable

from optuna.trial import FrozenTrial, TrialState

from compress.sweep.space import SweepSpec

Echo = Callable[[str], None]


def trial_line(trial: FrozenTrial, spec: SweepSpec, worker: str, done: int) -> str:
    """The terminal line for a finished trial; `done` is the study's completed trials."""
    a = trial.user_attrs
    head = f"[{done}/{spec.trials}] trial {trial.number} ({worker})"
    what = a.get("stages") or "baseline"
    if a.get("seed"):
        what = f"{a['seed']}: {what}"
    if trial.state == TrialState.PRUNED:
        return f"{head} skipped {what}: {a.get('error', 'pruned')}"
    if trial.state != TrialState.COMPLETE:
        return f"{head} FAILED {what}: {a.get('error', trial.state.name)}"
    parts = []
    for key, fmt in (
        ("perplexity", "ppl {:.2f}"),
        ("perplexity_ratio", "({:.4f}x)"),
        ("latency_ratio", "latency {:.3f}x"),
        ("weight_bytes_ratio", "weights {:.3f}x"),
    ):
        if isinstance(a.get(key), (int, float)):
            parts.append(fmt.format(a[key]))
    src = f", reused from {a['cached_from']}" if a.get("cached_from") else ""
    sec = a.get("seconds")
    took = f" [{sec:.1f} s{src}]" if isinstance(sec, (int, float)) else ""
    return f"{head} {what}: {' '.join(parts)}{took}"
