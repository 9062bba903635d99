"""Stop a run whose training has diverged, before its checkpoints are overwritten.

Non-finite values are caught where they appear (loss, gradient norm, rollout logits:
:func:`nemo_opd.train.step.stop_if_nonfinite`, :func:`nemo_opd.rollout.sampling.sample_tokens`).
:class:`DivergenceGuard` catches the finite collapse that follows a learning rate far too high:
after ``warmup`` steps, a step whose loss or forward/reverse KL exceeds ``factor`` times its
running level (the median of the last ``window`` steps, floored at ``floor`` so that tiny
divergences may grow freely), or whose gradient norm is exactly 0 while its loss is not.

The guard is asked after every step and before that step's checkpoint is saved, so a diverged
state is never saved and never rotates out the last checkpoint saved before it.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Mapping

__all__ = ["DivergenceGuard", "DivergenceError"]

WATCHED = ("loss", "forward_kl", "reverse_kl")
"""The per-step metrics whose running level is watched."""


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step, the quantity and its running level."""


class DivergenceGuard:
    """``guard.check(step, metrics)`` raises :class:`DivergenceError` on a diverged step.

    Args:
        factor: a watched value above ``factor × max(running median, floor)`` is divergence;
            0 turns the level check off (the zero-gradient check stays).
        window: steps in the running median.
        warmup: steps observed before the level check starts.
        floor: the smallest running level (nats): values below it never count as diverged.
    """

    def __init__(self, factor: float = 10.0, *, window: int = 10, warmup: int = 3,
                 floor: float = 1.0) -> None:
        self.factor, self.warmup, self.floor = factor, warmup, floor
        self.history = {name: collections.deque(maxlen=window) for name in WATCHED}

    def check(self, step: int, metrics: Mapping[str, float | None]) -> None:
        """Raise if ``metrics`` of ``step`` (0-based; the caller names it in its message)
        diverged; else add them to the running level."""
        loss, grad_norm = metrics.get("loss"), metrics.get("grad_norm")
        if grad_norm == 0.0 and loss is not None and loss > 0:
            raise DivergenceError(
                f"gradient norm is exactly 0 with loss {loss:.4g} (saturated "
                "logits after too large an update)")
        for name, values in self.history.items():
            value = metrics.get(name)
            if value is None or not math.isfinite(value):
                continue
            if self.factor and len(values) >= self.warmup:
                level = max(statistics.median(values), self.floor)
                if value > self.factor * level:
                    raise DivergenceError(
                        f"{name} = {value:.4g} is more than {self.factor:g} x its "
                        f"running level {level:.4g} (median of the last {len(values)} steps)")
            values.append(value)
