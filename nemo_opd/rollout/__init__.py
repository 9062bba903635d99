"""Rollout engines: the protocol the trainer uses, and the backends that implement it.

* :class:`RolloutEngine`, :class:`SamplingParams`, :class:`RolloutBatch` — the protocol;
* :class:`MegatronEngine` — the training student generates in place (KV cache, any TP size);
* :class:`TeacherSeededRollouts` + :class:`PrefixSchedule` — the teacher writes the first N
  tokens, the student continues (seed 004);
* :func:`sample_tokens`, :func:`filter_logits` — the sampling math shared by engines.
"""

from typing import Any

from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, RolloutEngine, SamplingParams
from nemo_opd.rollout.sampling import SampledTokens, filter_logits, sample_tokens
from nemo_opd.rollout.teacher_seeded import LossTokens, PrefixSchedule, TeacherSeededRollouts

__all__ = [
    "LogprobKind",
    "LossTokens",
    "MegatronEngine",
    "PrefixSchedule",
    "RolloutBatch",
    "RolloutEngine",
    "SampledTokens",
    "SamplingParams",
    "TeacherSeededRollouts",
    "filter_logits",
    "sample_tokens",
]


def __getattr__(name: str) -> Any:
    # MegatronEngine imports megatron-core; configs that only need SamplingParams stay light.
    if name == "MegatronEngine":
        from nemo_opd.rollout.megatron_engine import MegatronEngine

        return MegatronEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
