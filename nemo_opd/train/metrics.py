"""Per-step metrics sinks on rank 0: console progress (:class:`nemo_opd.console.Progress`),
JSONL, TensorBoard, wandb.

Every sink is optional; TensorBoard is skipped with one notice when the ``tensorboard`` package is
missing, wandb is used only when a project is configured (and must then be installed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nemo_opd.config import RunConfig
from nemo_opd.console import Progress

__all__ = ["MetricsLogger"]

logger = logging.getLogger(__name__)

_BAR_KEYS = ("loss", "reverse_kl", "lr", "step_seconds")


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Drop the records of steps after ``start_step`` from ``path``: a resumed run (or a new
    one, ``start_step`` 0) writes those steps again, and the file must hold each step once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= start_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
    logger.info("%s: dropped %d records after step %d (they are written again from there)",
                path, len(lines) - len(kept), start_step)


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line of a killed run: dropped too


class MetricsLogger:
    """Writes each step's metrics dict to the configured sinks (no-op on ranks other than 0)."""

    def __init__(self, cfg: RunConfig, *, rank: int, total_steps: int, start_step: int = 0
                 ) -> None:
        self.enabled = rank == 0
        self.cfg, self.total_steps = cfg.logging, total_steps
        self._jsonl = self._tensorboard = self._wandb = self._progress = None
        if not self.enabled:
            return
        if self.cfg.progress_bar:
            self._progress = Progress(total_steps, initial=start_step)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.jsonl:
            _truncate_jsonl(out / "metrics.jsonl", start_step)
            self._jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: TensorBoard logging skipped")
            else:
                self._tensorboard = SummaryWriter(str(out / "tensorboard"))
        if self.cfg.wandb_project:
            import wandb

            self._wandb = wandb.init(project=self.cfg.wandb_project, config=cfg.to_dict(),
                                     dir=str(out), resume="allow")

    @property
    def jsonl_path(self) -> Path | None:
        return Path(self._jsonl.name) if self._jsonl is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of optimizer step ``step`` (1-based count of steps done)."""
        if not self.enabled or (step % self.cfg.every and step != self.total_steps):
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._progress is not None:
            self._progress.update(step, {k: numbers[k] for k in _BAR_KEYS if k in numbers})

    def log_event(self, step: int, kind: str, payload: dict[str, Any]) -> None:
        """A non-metric record (evaluation results, a NaN stop) in the JSONL file and wandb."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "event": kind, **payload}) + "\n")
            self._jsonl.flush()
        numbers = {f"{kind}/{k}": v for k, v in payload.items() if isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None and numbers:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
