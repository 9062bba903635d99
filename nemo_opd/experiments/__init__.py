"""The seed reproduction's building blocks (docs/reproduction.md, recipes/reproduce_seeds.py).

* :mod:`nemo_opd.experiments.stats` — means and differences over seeds with 95 % intervals, and
  the verdict rules (reproduced / not reproduced / inconclusive) fixed before any run;
* :mod:`nemo_opd.experiments.findings` — the findings as data: cells (recipe overrides), claims,
  presets, and the runs they plan;
* :mod:`nemo_opd.experiments.report` — per-seed results → estimates, verdicts, tables and a figure.
"""
