"""Run lm-eval on a model and reduce its output to one results record per run.

:func:`evaluate_model` takes a megatron ``GPTModel`` (+ tokenizer) or any lm-eval ``LM`` (our
:class:`~nemo_opd.eval.lm.MegatronLM`, lm-eval's ``HFLM`` on a dequantised export, TensorRT-LLM),
resolves task names (:func:`nemo_opd.eval.tasks.resolve_tasks`, every check before the model
runs), runs lm-eval's ``evaluate`` and returns a :data:`RESULT_SCHEMA` record::

    {"schema": "nemo_opd.eval/1", "run": "student", "role": "student",
     "numerics": "megatron fake-quant fp32",
     "tasks": {"hellaswag": {"label": "HellaSwag", "metric": "acc_norm,none", "value": 0.51,
                             "stderr": 0.005, "n": 10042}, ...},
     "average": 0.65, "settings": {"limit": null, "num_fewshot": null, ...}}

A column made of several lm-eval tasks (MMLU's 57 subjects) is their document-weighted mean,
as lm-eval's own MMLU group reports it. At TP > 1 every rank of the model runs the evaluation
(identical results); callers write files from rank 0 only (:func:`nemo_opd.runtime.is_rank0`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_opd.eval.tasks import LocalTask, ResolvedTask, load_tasks, resolve_tasks

if TYPE_CHECKING:
    from nemo_opd.eval.lm import LMConfig

# torch, lm-eval and megatron are imported where a model is evaluated, not here: the command
# line reads ROLES and RESULT_SCHEMA from this module to show its --help.

__all__ = ["RESULT_SCHEMA", "evaluate_model", "ROLES"]

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "nemo_opd.eval/1"
FEWSHOT_SEED = 1234
"""lm-eval's default seed for choosing few-shot examples (same prompts as its CLI)."""
ROLES = ("teacher", "ptq", "student")
"""Roles the results table knows: the PTQ gap is measured between ``teacher`` and ``ptq``."""


def _as_lm(lm_or_model: Any, tokenizer: Any, lm_config: LMConfig | None):
    from lm_eval.api.model import LM

    from nemo_opd.eval.lm import MegatronLM

    if isinstance(lm_or_model, LM):
        return lm_or_model
    if tokenizer is None:
        raise ValueError("evaluating a model (not an lm-eval LM) needs its tokenizer: "
                         "evaluate_model(model, tokenizer=AutoTokenizer.from_pretrained(dir))")
    return MegatronLM(lm_or_model, tokenizer, lm_config)


def _column(task: ResolvedTask, results: Mapping[str, Any]) -> dict[str, Any]:
    """Document-weighted mean (and its standard error) of ``task.metric`` over the leaves."""
    metric, _, filt = task.metric.partition(",")
    stderr_key = f"{metric}_stderr,{filt}"
    total, weighted, variance = 0, 0.0, 0.0
    for leaf in task.leaves:
        row = results["results"].get(leaf)
        if row is None or task.metric not in row:
            raise KeyError(f"lm-eval returned no {task.metric!r} for task {leaf!r} "
                           f"(has: {sorted(row or {})})")
        n = int(results["n-samples"][leaf]["effective"])
        total += n
        weighted += n * float(row[task.metric])
        stderr = row.get(stderr_key)
        variance += (n * float(stderr)) ** 2 if isinstance(stderr, (int, float)) else math.nan
    if total == 0:
        raise ValueError(f"task {task.name!r} evaluated no documents")
    stderr = math.sqrt(variance) / total
    return {"label": task.label, "metric": task.metric, "value": weighted / total,
            "stderr": None if math.isnan(stderr) else stderr, "n": total}


def _set_fewshot(task: Any, num_fewshot: int | None) -> None:
    """``simple_evaluate``'s few-shot rules: ``num_fewshot`` overrides a task's default unless
    its config pins 0; no default means 0; few-shot sampling is seeded (lm-eval's 1234)."""
    default = task.get_config("num_fewshot")
    if num_fewshot is not None and default != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif default is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


def evaluate_model(lm_or_model: Any, tasks: Sequence[str] = (), *,
                   local_tasks: Mapping[str, str | Path | LocalTask] | None = None,
                   tokenizer: Any = None, lm_config: LMConfig | None = None,
                   data_dir: str | Path | None = None, limit: int | float | None = None,
                   num_fewshot: int | None = None, run_name: str = "model",
                   role: str | None = None, numerics: str | None = None,
                   bootstrap_iters: int = 1000) -> dict[str, Any]:
    """Evaluate a model on named and local tasks; return a results record (see module doc).

    Args:
        lm_or_model: an lm-eval ``LM``, or a megatron ``GPTModel`` (wrapped in
            :class:`MegatronLM` with ``tokenizer`` and ``lm_config``).
        tasks: task or task-set names (:data:`~nemo_opd.eval.tasks.TASK_SETS`,
            :data:`~nemo_opd.eval.tasks.HUB_TASKS`, keys of ``local_tasks``); empty: all local
            tasks.
        local_tasks: name → jsonl path (kind read from the records) or :class:`LocalTask`.
        data_dir: read benchmark data from local jsonl files (:mod:`nemo_opd.eval.tasks`).
        limit: documents per task (int) or fraction (float < 1); None: all.
        num_fewshot: few-shot examples per prompt; None: each task's default.
        run_name, role: the results-table row (``role`` in :data:`ROLES` or None).
        numerics: how the model computed (``"megatron fake-quant fp32"``, ``"HF dequantised
            bf16"``, ``"TRT-LLM"``); default: the LM's ``numerics`` attribute.
        bootstrap_iters: lm-eval's bootstrap resamples for non-mean metrics' standard errors.
    """
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be positive or None, got {limit!r}")
    resolved = resolve_tasks(tasks, local_tasks, data_dir=data_dir, num_fewshot=num_fewshot)
    lm = _as_lm(lm_or_model, tokenizer, lm_config)
    numerics = numerics or getattr(lm, "numerics", type(lm).__name__)

    import torch
    from lm_eval.evaluator import evaluate

    from nemo_opd.quant.student import weights_quantized_once
    from nemo_opd.runtime import is_rank0

    loaded = load_tasks(resolved)
    for task in loaded["tasks"].values():
        _set_fewshot(task, num_fewshot)
    if is_rank0():
        logger.debug("evaluating %s (%s) on %s", run_name, numerics,
                     ", ".join(f"{t.name} [{len(t.leaves)} task(s)]" for t in resolved))
    # lm-eval's lower-level `evaluate`, not `simple_evaluate`: the latter returns results on
    # LOCAL_RANK 0 only and reseeds the global RNGs (an in-loop evaluation must not reseed
    # training). Every TP rank gets the same results; callers write from rank 0.
    # The weights are fixed while lm-eval runs: a quantized model quantizes them once.
    model = getattr(lm, "model", None)
    with (weights_quantized_once(model) if isinstance(model, torch.nn.Module)
          else contextlib.nullcontext()):
        results = evaluate(lm=lm, task_dict=loaded, limit=limit,
                           bootstrap_iters=bootstrap_iters, log_samples=False)
    columns = {task.name: _column(task, results) for task in resolved}
    return {
        "schema": RESULT_SCHEMA,
        "run": run_name,
        "role": role,
        "numerics": numerics,
        "tasks": columns,
        "average": sum(c["value"] for c in columns.values()) / len(columns),
        "settings": {"limit": limit, "num_fewshot": num_fewshot,
                     "data_dir": None if data_dir is None else str(data_dir),
                     "lm_eval_version": _lm_eval_version(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
    }


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")
