"""Rollout engines: the protocol the trainer uses, and the backends that implement it.

* :class:`RolloutEngine`, :class:`SamplingParams`, :class:`RolloutBatch` — the protocol;
* :class:`MegatronEngine` — the training student generates in place (KV cache, any TP size);
* :class:`HFEngine` — Hugging Face ``transformers`` on the student's dequantised weights, refit
  in place after every optimizer step (an external engine that runs here);
* :class:`TensorRTLLMEngine`, :class:`VLLMEngine` — external engines in their containers
  (imported lazily, not run here);
* :func:`make_engine`, :func:`check_engine` — the engine ``cfg.rollout.engine`` names, and the
  checks it must pass before the first step;
* :class:`TeacherSeededRollouts` + :class:`PrefixSchedule` — the teacher writes the first N
  tokens, the student continues (seed 004);
* :func:`sample_tokens`, :func:`filter_logits` — the sampling math shared by engines.
"""

import importlib
from typing import Any

from nemo_opd.rollout.engine import (
    LogprobKind,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    engine_logprob_kinds,
    engine_returns_logprobs,
)
from nemo_opd.rollout.sampling import SampledTokens, filter_logits, sample_tokens
from nemo_opd.rollout.teacher_seeded import LossTokens, PrefixSchedule, TeacherSeededRollouts

__all__ = [
    "HFEngine",
    "LogprobKind",
    "LossTokens",
    "MegatronEngine",
    "PrefixSchedule",
    "RolloutBatch",
    "RolloutEngine",
    "SampledTokens",
    "SamplingParams",
    "TeacherSeededRollouts",
    "TensorRTLLMEngine",
    "VLLMEngine",
    "check_engine",
    "engine_logprob_kinds",
    "engine_returns_logprobs",
    "filter_logits",
    "make_engine",
    "sample_tokens",
]

# Imported on first use: MegatronEngine needs megatron-core, HFEngine transformers, the factory
# the run config; TensorRT-LLM and vLLM are imported only when such an engine is built.
_LAZY = {
    "MegatronEngine": "nemo_opd.rollout.megatron_engine",
    "HFEngine": "nemo_opd.rollout.hf_engine",
    "TensorRTLLMEngine": "nemo_opd.rollout.trtllm_engine",
    "VLLMEngine": "nemo_opd.rollout.vllm_engine",
    "make_engine": "nemo_opd.rollout.factory",
    "check_engine": "nemo_opd.rollout.factory",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
