"""Per-layer sensitivity scan: ``python -m compress.scan RECIPE``.

- :mod:`~compress.scan.spec`: the recipe's ``scan:`` section
- :mod:`~compress.scan.measure`: one layer compressed at a time, perplexity measured, cached
- :mod:`~compress.scan.allocation`: per-layer sparsity from the scan (OWL-style)
- :mod:`~compress.scan.workspace`: the scan of a run's model, as stages and sweeps use it
- :mod:`~compress.scan.report`: ``scan.csv``, ``scan.json`` and the heat map ``scan.html``
"""
