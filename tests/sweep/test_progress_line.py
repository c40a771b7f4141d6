"""A sweep's per-trial terminal line: at most 80 columns, numbers first, noise flagged."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from compress.sweep.progress import trial_line
from compress.sweep.space import SweepSpec

SPEC = SweepSpec(
    trials=120,
    params={"s": {"float": [0.1, 0.9]}},
    pipeline=[{"prune": {"sparsity": "$s"}}, {"int8": {}}],
)
WORKER = "a-rather-long-host-name.example.org:123456"
STAGES = (
    "prune(sparsity=0.15, method=wanda, targets=[blocks.*.mlp.*, blocks.*.attn.*]) -> "
    "int8(targets=[blocks.*], ignore=[lm_head]) -> distill(teacher=baseline, steps=200)"
)


def _trial(state: TrialState, **attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=state,
        values=[1.0, 1.0, 1.0] if state == TrialState.COMPLETE else None,
        user_attrs={"stages": STAGES, **attrs},
    )


def test_a_complete_trial_fits_80_columns_and_flags_noisy_latency() -> None:
    t = _trial(
        TrialState.COMPLETE,
        perplexity=12345.678,
        perplexity_ratio=1.0123,
        latency_ratio=1.55,
        latency_noisy=True,
        weight_bytes_ratio=0.2631,
        seconds=1234.5,
        cached_from="trial 17",
    )
    line = trial_line(t, SPEC, WORKER, 100)
    assert len(line) <= 80, line
    assert line.startswith("[100/120] trial -1 (..example.org:123456) ppl 12346 lat 1.550x noisy")
    short = trial_line(t, SPEC, "vm:4242", 100)
    assert len(short) <= 80, short
    assert short.startswith("[100/120] trial -1 (vm:4242) ppl 12346 lat 1.550x noisy size 0.263x")
    assert short.endswith("| prune(sp..")  # the stages, cut to fit


def test_a_quiet_latency_is_not_flagged_and_short_lines_stay_whole() -> None:
    t = _trial(
        TrialState.COMPLETE,
        perplexity=42.3,
        latency_ratio=0.51,
        latency_noisy=False,
        weight_bytes_ratio=0.26,
        seconds=9.0,
        stages="int8",
    )
    line = trial_line(t, SPEC, "w:1", 3)
    assert "noisy" not in line
    assert line == "[3/120] trial -1 (w:1) ppl 42.30 lat 0.510x size 0.260x 9.0 s | int8"


def test_failed_and_skipped_trials_fit_80_columns() -> None:
    error = "RuntimeError: " + "a very long message from deep inside the stage " * 5
    failed = trial_line(_trial(TrialState.FAIL, error=error), SPEC, WORKER, 7)
    assert len(failed) <= 80 and "FAILED: RuntimeError" in failed
    pruned = trial_line(_trial(TrialState.PRUNED, error=error), SPEC, WORKER, 7)
    assert len(pruned) <= 80 and " skipped " in pruned
