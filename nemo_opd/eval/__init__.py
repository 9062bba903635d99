"""Evaluation with lm-eval: megatron models as lm-eval LMs, the seeds' task suite with offline
data, exported checkpoints, results tables and plots, an in-loop hook and the ``eval`` command.

* :class:`MegatronLM` — lm-eval ``LM`` over a megatron-core ``GPTModel`` (TP-aware), registered in
  lm-eval as ``nemo_opd``; :func:`open_megatron_lm` loads one from a checkpoint directory;
* :func:`evaluate_model` — tasks by name (:data:`TASK_SETS`, :data:`HUB_TASKS`, :class:`LocalTask`)
  → one results record;
* :func:`dequantize_export`, :func:`hf_lm`, :func:`trtllm_lm` — the exported checkpoint;
  :func:`checkpoint_dtype` — the dtype a checkpoint is stored (and by default evaluated) in;
* :func:`write_report` / :func:`build_table` — the seeds' table (Markdown, JSON, PNG);
* :func:`make_eval_hook` — evaluation every N training steps;
* :mod:`nemo_opd.eval.cli` — ``nemo_opd eval`` and ``nemo_opd eval compare``;
* :mod:`nemo_opd.eval.lm_eval_cli` — ``nemo_opd lm_eval``: lm-eval's own CLI, ``--model nemo_opd``.

Names resolve on first use: importing this package does not import lm-eval or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_opd.eval.evaluate import evaluate_model
    from nemo_opd.eval.exported import (
        BackendUnavailable,
        checkpoint_dtype,
        dequantize_export,
        hf_lm,
        register_dequantizer,
        trtllm_lm,
    )
    from nemo_opd.eval.hook import make_eval_hook
    from nemo_opd.eval.lm import LMConfig, MegatronLM, TokenizerRoundTripError, open_megatron_lm
    from nemo_opd.eval.report import build_table, load_results, write_report
    from nemo_opd.eval.tasks import HUB_TASKS, TASK_SETS, LocalTask

_EXPORTS = {
    "evaluate_model": "evaluate",
    "BackendUnavailable": "exported",
    "checkpoint_dtype": "exported",
    "dequantize_export": "exported",
    "hf_lm": "exported",
    "register_dequantizer": "exported",
    "trtllm_lm": "exported",
    "make_eval_hook": "hook",
    "LMConfig": "lm",
    "MegatronLM": "lm",
    "TokenizerRoundTripError": "lm",
    "open_megatron_lm": "lm",
    "build_table": "report",
    "load_results": "report",
    "write_report": "report",
    "HUB_TASKS": "tasks",
    "TASK_SETS": "tasks",
    "LocalTask": "tasks",
}

__all__ = [
    "BackendUnavailable",
    "HUB_TASKS",
    "LMConfig",
    "LocalTask",
    "MegatronLM",
    "TASK_SETS",
    "TokenizerRoundTripError",
    "build_table",
    "checkpoint_dtype",
    "dequantize_export",
    "evaluate_model",
    "hf_lm",
    "load_results",
    "make_eval_hook",
    "open_megatron_lm",
    "register_dequantizer",
    "trtllm_lm",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
