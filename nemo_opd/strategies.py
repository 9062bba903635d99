"""Seed 004's distillation schedules as small objects that answer, per step, "what do I do".

A strategy maps ``(step, micro_batch)`` to a :class:`StepPlan`: which sequence sources to score
(``"dataset"`` = reference responses, off-policy; ``"rollout"`` = fresh student rollouts,
on-policy; ``"replay"`` = stored past rollouts), the weight of each part's loss, the teacher
prefix length of teacher-seeded rollouts, and the weight of the KL anchor. Plans are pure
functions of the configuration and ``(seed, step, micro_batch)``: identical on every rank and
after a resume, with no state to checkpoint.

λ (``DistillConfig.lmbda``, ARCHITECTURE.md "Definitions") is the probability that a batch is
on-policy, drawn per micro batch (:func:`nemo_opd.data.lambda_draw`). Strategies with an
"on-policy phase" use that draw there; the off-policy phases are always dataset batches.

=====================  ==================================================================
name                   plan at step ``s``
=====================  ==================================================================
on_policy_gkd          λ-draw → rollout, else dataset
extended_on_policy     same as on_policy_gkd, for ``extended_factor × optim.steps`` steps
hybrid                 ``s < K``: dataset; then λ-draw (K = ``switch_step``)
reverse_curriculum     ``s < K``: λ-draw; then dataset
teacher_seeded         λ-draw → rollout whose first N(s) tokens the teacher writes
                       (N from :class:`~nemo_opd.rollout.teacher_seeded.PrefixSchedule`)
mixture                both each step: ``w · L(dataset) + (1 − w) · L(rollout)``
replay_buffer          λ-draw → rollout; every ``replay_every``-th step a replayed batch
kl_anchored            λ-draw, plus ``γ · KL(student ‖ initial student)``
=====================  ==================================================================

The two teacher set-ups of the seeds are not schedules but views of the teacher's input:
self-distillation (the teacher is the student's original weights: ``ModelConfig.teacher = ""``)
and context distillation (:class:`TeacherContext`: the teacher reads a few-shot context before
the sequence the student reads; its logits are shifted back onto the student's positions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from nemo_opd.config import DistillConfig, StrategyConfig
from nemo_opd.data.mixing import lambda_draw
from nemo_opd.rollout.teacher_seeded import PrefixSchedule

__all__ = ["PlanPart", "StepPlan", "Strategy", "TeacherContext", "build_strategy"]


@dataclasses.dataclass(frozen=True)
class PlanPart:
    """One batch of sequences to score and the weight of its loss."""

    source: str
    """``"dataset"``, ``"rollout"`` or ``"replay"``."""
    weight: float = 1.0
    """Multiplies this part's loss (parts of a step sum)."""
    prefix_tokens: int = 0
    """Teacher-written tokens at the start of each rollout (``"rollout"`` only)."""


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one micro batch does."""

    parts: tuple[PlanPart, ...]
    anchor_weight: float = 0.0
    """γ of ``γ · KL(student ‖ initial student)`` added to every part (0 = no anchor)."""

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(p.source for p in self.parts)


class Strategy:
    """A schedule; :meth:`plan` is all the trainer asks."""

    def __init__(self, cfg: StrategyConfig, *, lmbda: float, seed: int,
                 prefix_schedule: Callable[[int], int] | None = None) -> None:
        if cfg.name == "teacher_seeded" and prefix_schedule is None:
            raise ValueError("the teacher_seeded strategy needs a prefix_schedule")
        self.cfg, self.lmbda, self.seed = cfg, lmbda, seed
        self.prefix_schedule = prefix_schedule
        """Teacher-prefix length per step (teacher_seeded), else None."""

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def needs_anchor(self) -> bool:
        """Whether the trainer must keep a frozen copy of the initial student."""
        return self.cfg.name == "kl_anchored" and self.cfg.anchor_weight > 0

    def _draw(self, step: int, micro_batch: int) -> str:
        on = lambda_draw(self.lmbda, seed=self.seed, step=step, micro_batch=micro_batch)
        return "rollout" if on else "dataset"

    def plan(self, step: int, micro_batch: int = 0) -> StepPlan:
        """The plan of micro batch ``micro_batch`` of optimizer step ``step`` (0-based)."""
        cfg, name = self.cfg, self.cfg.name
        if name == "mixture":
            parts = tuple(PlanPart(src, w) for src, w in (("dataset", cfg.mixture_weight),
                                                           ("rollout", 1 - cfg.mixture_weight))
                          if w > 0)
            return StepPlan(parts)
        if name == "hybrid":
            source = "dataset" if step < cfg.switch_step else self._draw(step, micro_batch)
        elif name == "reverse_curriculum":
            source = self._draw(step, micro_batch) if step < cfg.switch_step else "dataset"
        else:
            source = self._draw(step, micro_batch)
        if source == "rollout" and name == "replay_buffer" and (step + 1) % cfg.replay_every == 0:
            source = "replay"
        prefix = (self.prefix_schedule(step)
                  if source == "rollout" and name == "teacher_seeded" else 0)
        anchor = cfg.anchor_weight if name == "kl_anchored" else 0.0
        return StepPlan((PlanPart(source, 1.0, prefix),), anchor)


def build_strategy(distill: DistillConfig, *, seed: int) -> Strategy:
    """The configured strategy (teacher_seeded takes its prefix lengths from the rollout
    package's :class:`~nemo_opd.rollout.teacher_seeded.PrefixSchedule`)."""
    cfg = distill.strategy
    schedule = None
    if cfg.name == "teacher_seeded":
        schedule = PrefixSchedule(start=cfg.seed_tokens, end=0, decay_steps=cfg.seed_decay_steps)
    return Strategy(cfg, lmbda=distill.lmbda, seed=seed, prefix_schedule=schedule)


@dataclasses.dataclass(frozen=True)
class TeacherContext:
    """Context distillation: the teacher reads ``context_ids`` before every sequence.

    The student scores ``tokens [B, T]``; the teacher scores ``[context, tokens] [B, C + T]``
    with positions ``0 .. C + T − 1``. Teacher position ``C + t`` has read exactly the context
    and ``tokens[:, :t+1]``, so its logits predict the same next token as the student's at ``t``:
    :meth:`align` keeps teacher logits ``[:, C:C+T]``. With no context both are identities.
    """

    context_ids: tuple[int, ...] = ()

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, C + T]`` teacher input ids."""
        if not self.context_ids:
            return tokens
        context = torch.tensor(self.context_ids, dtype=tokens.dtype, device=tokens.device)
        return torch.cat([context.expand(tokens.shape[0], -1), tokens], dim=1)

    def align(self, teacher_out: torch.Tensor, length: int) -> torch.Tensor:
        """Teacher outputs ``[B, C + T, ...]`` → the student's positions ``[B, T, ...]``."""
        offset = len(self.context_ids)
        if teacher_out.shape[1] != offset + length:
            raise ValueError(f"teacher output has {teacher_out.shape[1]} positions, expected "
                             f"context {offset} + sequence {length}")
        return teacher_out[:, offset:offset + length]
