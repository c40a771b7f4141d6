"""Which worker runs which trial: trials queued again after an interruption.

A worker killed mid-trial stops heartbeating; its trial is failed and queued again once the
grace period passes. Ctrl-C fails the running trial with reason "interrupted", and the worker
queues it again before it exits.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState


def requeue_interrupted(study: optuna.Study, worker: str | None = None) -> int:
    """Queue again, once each, the trials that Ctrl-C failed (only those ``worker`` ran, if
    given): the same parameters as a new WAITING trial, marked the way Optuna marks the retry
    of a stale trial. The interrupted worker does this itself; a run that starts does it for
    any left over (a worker stopped before it could)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    n = 0
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get("interrupted"):
            continue
        if worker is not None and t.user_attrs.get("worker") != worker:
            continue
        if t.number in retried:
            continue
        keep = {k: v for k, v in t.user_attrs.items() if k in ("seed",)}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                user_attrs=keep,
                system_attrs={"failed_trial": t.number, "retry_history": [t.number]},
            )
        )
        n += 1
    return n
