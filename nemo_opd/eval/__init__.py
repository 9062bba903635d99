"""Evaluation with lm-eval: megatron models as lm-eval LMs, the seeds' task suite with offline
data, exported checkpoints, results tables and plots, an in-loop hook and the ``eval`` command.

* :class:`MegatronLM` — lm-eval ``LM`` over a megatron-core ``GPTModel`` (TP-aware);
* :func:`evaluate_model` — tasks by name (:data:`TASK_SETS`, :data:`HUB_TASKS`, :class:`LocalTask`)
  → one results record;
* :func:`dequantize_export`, :func:`hf_lm`, :func:`trtllm_lm` — the exported checkpoint;
* :func:`write_report` / :func:`build_table` — the seeds' table (Markdown, JSON, PNG);
* :func:`make_eval_hook` — evaluation every N training steps;
* :mod:`nemo_opd.eval.cli` — ``nemo_opd eval`` and ``nemo_opd eval compare``.

Names resolve on first use: importing this package does not import lm-eval or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_opd.eval.evaluate import evaluate_model
    from nemo_opd.eval.exported import (
        BackendUnavailable,
        dequantize_export,
        hf_lm,
        register_dequantizer,
        trtllm_lm,
    )
    from nemo_opd.eval.hook import make_eval_hook
    from nemo_opd.eval.lm import LMConfig, MegatronLM, TokenizerRoundTripError
    from nemo_opd.eval.report import build_table, load_results, write_report
    from nemo_opd.eval.tasks import HUB_TASKS, TASK_SETS, LocalTask

_EXPORTS = {
    "evaluate_model": "evaluate",
    "BackendUnavailable": "exported",
    "dequantize_export": "exported",
    "hf_lm": "exported",
    "register_dequantizer": "exported",
    "trtllm_lm": "exported",
    "make_eval_hook": "hook",
    "LMConfig": "lm",
    "MegatronLM": "lm",
    "TokenizerRoundTripError": "lm",
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
    "dequantize_export",
    "evaluate_model",
    "hf_lm",
    "load_results",
    "make_eval_hook",
    "register_dequantizer",
    "trtllm_lm",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
