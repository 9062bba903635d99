"""Rollout engines: the protocol the trainer uses, and the backends that implement it."""

from nemo_opd.rollout.engine import LogprobKind, RolloutBatch, RolloutEngine, SamplingParams

__all__ = ["LogprobKind", "RolloutBatch", "RolloutEngine", "SamplingParams"]
