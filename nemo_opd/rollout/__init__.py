"""Rollout engines: the protocol the trainer uses, and the backends that implement it.

* :class:`RolloutEngine`, :class:`SamplingParams`, :class:`RolloutBatch` — the protocol;
* :class:`MegatronEngine` — the training student generates in place (KV cache, any TP size);
* :class:`TeacherSeededRollouts` + :class:`PrefixSchedule` — the teacher writes the first N
  tokens, the student continues (seed 004);
* :func:`sample_tokens`, :func:`filter_logits` — the sampling math shared by engines.
"""

from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, RolloutEngine, SamplingParams
from nemo_opd.rollout.megatron_engine import MegatronEngine
from nemo_opd.rollout.sampling import SampledTokens, filter_logits, sample_tokens

__all__ = [
    "LogprobKind",
    "MegatronEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SampledTokens",
    "SamplingParams",
    "filter_logits",
    "sample_tokens",
]
