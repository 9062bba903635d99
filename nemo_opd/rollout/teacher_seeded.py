"""Teacher-seeded rollouts (seed 004): the teacher writes the first N tokens, the student continues.

Early in training the quantized student's own rollouts drift off the data manifold; letting the
teacher write the opening ``N`` tokens keeps rollouts on it while the student learns, and ``N``
decays (:class:`PrefixSchedule`, default 20 → 0 over 50 steps) until rollouts are fully
on-policy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch

from nemo_opd.rollout.engine import RolloutBatch, RolloutEngine, SamplingParams

__all__ = ["LossTokens", "PrefixSchedule", "TeacherSeededRollouts"]

LossTokens = Literal["student", "teacher", "all"]
"""Which response tokens carry loss: the student's continuation, the teacher's prefix, or both."""

_LOSS_TOKENS = ("student", "teacher", "all")


@dataclasses.dataclass(frozen=True)
class PrefixSchedule:
    """Teacher-prefix length per training step: linear from ``start`` to ``end``.

    ``N(step) = round(start + (end − start) · min(step, decay_steps) / decay_steps)``, rounded
    to the nearest integer (halves up) in exact integer arithmetic, so ``N(0) = start`` and
    ``N(step) = end`` from ``decay_steps`` on.
    """

    start: int = 20
    """Prefix tokens at step 0; >= 0."""
    end: int = 0
    """Prefix tokens from step ``decay_steps`` on; >= 0."""
    decay_steps: int = 50
    """Steps over which the length moves from ``start`` to ``end``; >= 0 (0: ``end`` at once)."""

    def __post_init__(self) -> None:
        for name in ("start", "end", "decay_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"PrefixSchedule.{name} must be an int >= 0, got {value!r}")

    def __call__(self, step: int) -> int:
        """Prefix length at training step ``step`` (>= 0)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if step >= self.decay_steps:
            return self.end
        return self.start + ((self.end - self.start) * 2 * step + self.decay_steps) // (
            2 * self.decay_steps)


class TeacherSeededRollouts:
    """Rollouts whose first ``schedule(step)`` response tokens the teacher writes.

    For each of the ``n`` samples of a prompt the teacher engine generates a prefix of
    ``N = min(schedule(step), max_new_tokens − 1)`` tokens (fewer if it writes a stop id, which
    then ends the row), and the student engine continues after it as a forced prefix for up to
    ``max_new_tokens − N`` tokens, so responses stay within ``max_new_tokens`` and the student
    writes at least one token unless the teacher stopped. ``min_new_tokens`` counts the whole
    response; stop ids apply to both.

    The returned batch is the student's: :attr:`RolloutBatch.prefix_lengths` are the teacher's
    tokens, :attr:`RolloutBatch.logprobs` hold the teacher engine's log-probs at prefix
    positions (the distribution those tokens were drawn from, for importance weights) and the
    student's after them, and :attr:`RolloutBatch.loss_mask` covers ``loss_tokens``.
    ``generation_seconds`` covers both engines.

    Layouts: every rank of the student's TP group must get the same prefixes, so the teacher's
    TP group must not span different student data-parallel ranks (teacher TP <= student TP,
    the same ranks laid out TP-fastest), and with a teacher on a smaller TP group than the
    student's, ``params.seed`` must be set (the teacher's groups cannot agree on a random seed
    across the student's group; the student engine raises if the prefixes differ).

    Args:
        student: engine of the model being trained (e.g. :class:`MegatronEngine` on it).
        teacher: engine of the teacher (same tokenizer/vocabulary).
        schedule: prefix length per step.
        loss_tokens: which response tokens carry loss (default: the student's only).
    """

    def __init__(self, student: RolloutEngine, teacher: RolloutEngine,
                 schedule: PrefixSchedule | None = None, *,
                 loss_tokens: LossTokens = "student") -> None:
        if loss_tokens not in _LOSS_TOKENS:
            raise ValueError(f"loss_tokens must be one of {_LOSS_TOKENS}, got {loss_tokens!r}")
        self.student = student
        self.teacher = teacher
        self.schedule = schedule or PrefixSchedule()
        self.loss_tokens = loss_tokens

    def prefix_length(self, step: int, params: SamplingParams) -> int:
        """Teacher tokens requested at ``step``: the schedule, capped so the student writes one."""
        return min(self.schedule(step), params.max_new_tokens - 1)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 step: int) -> RolloutBatch:
        """``params.n`` teacher-seeded continuations of every prompt at training ``step``."""
        started = time.perf_counter()
        n_prefix = self.prefix_length(step, params)
        if n_prefix == 0:
            batch = self.student.generate(prompts, params)
            return self._with_loss_mask(batch, time.perf_counter() - started)
        teacher_params = dataclasses.replace(
            params, max_new_tokens=n_prefix,
            min_new_tokens=min(params.min_new_tokens, n_prefix))
        seeded = self.teacher.generate(prompts, teacher_params)
        rows = range(seeded.tokens.shape[0])
        starts = seeded.prompt_lengths.tolist()
        ends = seeded.lengths.tolist()
        prefixes = [seeded.tokens[r, starts[r]:ends[r]].tolist() for r in rows]
        row_prompts = [seeded.tokens[r, :starts[r]].tolist() for r in rows]
        student_params = dataclasses.replace(
            params, n=1, max_new_tokens=params.max_new_tokens - n_prefix,
            min_new_tokens=max(params.min_new_tokens - n_prefix, 0),
            # A different stream from the teacher's: equal seeds would correlate the two draws.
            seed=None if params.seed is None else params.seed + 1)
        batch = self.student.generate(row_prompts, student_params, forced_prefixes=prefixes)
        if batch.logprob_kind != seeded.logprob_kind:
            raise ValueError(f"teacher engine recorded {seeded.logprob_kind!r} log-probs but the "
                             f"student engine {batch.logprob_kind!r}; they must agree")
        prefix_mask = batch.prefix_mask()
        width = min(batch.tokens.shape[1], seeded.logprobs.shape[1])
        batch.samples_per_prompt = params.n
        batch.logprobs[:, :width] = torch.where(prefix_mask[:, :width],
                                                seeded.logprobs[:, :width].to(batch.logprobs),
                                                batch.logprobs[:, :width])
        return self._with_loss_mask(batch, time.perf_counter() - started)

    def _with_loss_mask(self, batch: RolloutBatch, seconds: float) -> RolloutBatch:
        student_mask, teacher_mask = batch.generated_mask(), batch.prefix_mask()
        batch.loss_mask = {"student": student_mask, "teacher": teacher_mask,
                           "all": student_mask | teacher_mask}[self.loss_tokens]
        batch.generation_seconds = seconds
        return batch
