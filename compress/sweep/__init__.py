"""Optuna sweeps over a recipe's search space (the recipe's ``sweep:`` section).

- :mod:`compress.sweep.space`: the ``sweep:`` schema, `$param` templates, validation helpers
- :mod:`compress.sweep.runner`: study, trial 0 and seeds, the objective, workers
- :mod:`compress.sweep.driver`: :func:`~compress.sweep.driver.run_sweep`, what
  ``python -m compress.run RECIPE`` does for a recipe with a ``sweep:`` section
"""
