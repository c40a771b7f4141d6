"""Optuna sweeps over a recipe's search space (the recipe's ``sweep:`` section).

- :mod:`compress.sweep.space`: the ``sweep:`` schema, `$param` templates, validation helpers
- :mod:`compress.sweep.study`: storage, the study (created or joined), the sampler
- :mod:`compress.sweep.objective`: trial 0 and seeds, one trial's variant built and measured
- :mod:`compress.sweep.claims`: which worker runs which trial; interrupted trials queued again
- :mod:`compress.sweep.progress`: the terminal line of each finished trial
- :mod:`compress.sweep.runner`: the worker loop and the local worker processes
- :mod:`compress.sweep.driver`: :func:`~compress.sweep.driver.run_sweep`, what
  ``python -m compress.run RECIPE`` does for a recipe with a ``sweep:`` section
"""
