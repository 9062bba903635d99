"""Launching recipes with NeMo-Run.

- :mod:`nemo_opd.launch.verb` — the ``nemo run RECIPE.py`` verb (``nemo_run.cli`` entry point).
- :mod:`nemo_opd.launch.recipe` — presets, NeMo-Run's command line with close-name errors,
  ``--help``, pre-submission checks, confirmation for remote executors.
- :mod:`nemo_opd.launch.executors` — local torchrun, SLURM (pyxis/enroot), Docker executors.
- :mod:`nemo_opd.launch.memory` — memory per GPU from ``config.json``; refuses layouts over the
  GPU's memory before submission (``python -m nemo_opd.launch.memory`` prints a plan).
- :mod:`nemo_opd.launch.plans` — the recipe's evaluation and export sections.
- :mod:`nemo_opd.launch.stages` — demo assets, baselines, export evaluation, results table.

Submodules are imported on use: NeMo-Run and megatron-core take seconds to import.
"""
