"""In-loop evaluation: the trainer's evaluation hook.

``hook = make_eval_hook(["arith_mc"], every_n_steps=100, tokenizer=tok, local_tasks=...)`` is a
:data:`nemo_opd.train.loop.EvalHook`: the trainer calls ``hook(student, steps_done)``. When
``steps_done`` is a multiple of ``every_n_steps`` (every call when it is None: the caller
schedules, e.g. the trainer's ``eval_every`` plus the final step; step 0 only with
``at_start``) it evaluates the model in place — every rank of the model's TP group must call it,
as they do every training step — restores the model's train/eval modes, appends the full record
to ``history``, returns flat metrics ``{"eval/<task>": value, "eval/average": value}`` for the
trainer's logger and, on rank 0, writes ``<out_dir>/step_<step>.json`` and calls
``on_result(step, record)``. Other steps return None at once. The torch RNG is untouched
(lm-eval is not allowed to reseed), so evaluating does not change the training trajectory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nemo_opd.eval.evaluate import evaluate_model
from nemo_opd.eval.lm import LMConfig, MegatronLM
from nemo_opd.eval.tasks import LocalTask, resolve_tasks
from nemo_opd.runtime import is_rank0

__all__ = ["EvalHook", "make_eval_hook"]

logger = logging.getLogger(__name__)


class EvalHook:
    """``hook(model, step) -> metrics | None``; see :func:`make_eval_hook`."""

    def __init__(self, tasks: Sequence[str], every_n_steps: int | None, *, tokenizer: Any,
                 local_tasks: Mapping[str, str | Path | LocalTask] | None = None,
                 lm_config: LMConfig | None = None, limit: int | float | None = None,
                 data_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 run_name: str = "student", at_start: bool = False,
                 on_result: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, "
                             f"got {every_n_steps!r}")
        # Unknown names and missing data fail now, not hundreds of steps into training.
        resolve_tasks(tasks, local_tasks, data_dir=data_dir)
        self.tasks, self.every_n_steps, self.tokenizer = list(tasks), every_n_steps, tokenizer
        self.local_tasks, self.lm_config, self.limit = local_tasks, lm_config, limit
        self.data_dir, self.run_name, self.at_start = data_dir, run_name, at_start
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.on_result = on_result
        self.history: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        """Whether ``step`` evaluates."""
        every = self.every_n_steps or 1
        return step % every == 0 and (step > 0 or self.at_start)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float] | None:
        if not self.due(step):
            return None
        modes = [(module, module.training) for module in model.modules()]
        try:
            record = evaluate_model(
                MegatronLM(model, self.tokenizer, self.lm_config), self.tasks,
                local_tasks=self.local_tasks, limit=self.limit, data_dir=self.data_dir,
                run_name=f"{self.run_name}@{step}", role="student")
        finally:
            for module, training in modes:
                module.training = training
        record["step"] = step
        self.history.append(record)
        if is_rank0():
            logger.info("step %d eval: %s (avg %.4f)", step, ", ".join(
                f"{t}={c['value']:.4f}" for t, c in record["tasks"].items()), record["average"])
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / f"step_{step}.json").write_text(json.dumps(record, indent=2))
            if self.on_result is not None:
                self.on_result(step, record)
        metrics = {f"eval/{task}": cell["value"] for task, cell in record["tasks"].items()}
        return metrics | {"eval/average": record["average"]}


def make_eval_hook(tasks: Sequence[str], every_n_steps: int | None, **kwargs: Any) -> EvalHook:
    """An :class:`EvalHook` evaluating ``tasks`` every ``every_n_steps`` training steps (every
    call when None).

    Keyword arguments: ``tokenizer`` (required), ``local_tasks``, ``lm_config``, ``limit``,
    ``data_dir``, ``out_dir``, ``run_name``, ``at_start`` (also evaluate at step 0) and
    ``on_result(step, record)`` (rank 0 only).
    """
    return EvalHook(tasks, every_n_steps, **kwargs)
