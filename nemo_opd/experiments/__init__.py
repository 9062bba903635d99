"""The seed reproduction's building blocks (``docs/reproduction.md``).

* :mod:`nemo_opd.experiments.stats` — means and differences over seeds with 95 % intervals, and
  the verdict rules (reproduced / not reproduced / inconclusive) fixed before any run.
"""
