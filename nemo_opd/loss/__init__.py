"""Distillation losses: vocab-parallel, token-chunked divergences and a ModelOpt criterion.

All take logits as this rank's vocabulary shard ``[..., V/tp]`` (whole vocabulary when
``tp_group`` is None), never upcast more than one chunk of tokens, and return a masked mean over
tokens that is identical on every TP rank. ``beta`` is always the generalized-JSD interpolation
(0: forward ``KL(T‖S)``, 1: reverse ``KL(S‖T)``).

* :func:`generalized_jsd` — full-vocabulary divergence of student and teacher logits;
* :func:`fused_generalized_jsd` — the same from final hidden states and output-layer weights,
  without materialising logits;
* :func:`teacher_topk` + :func:`topk_generalized_jsd` — against the teacher's global top-k plus
  a tail bucket (:class:`TeacherTopK` is what a teacher on another layout sends or a cache holds);
* :func:`sampled_token_reverse_kl` — seed 003's per-token reverse-KL advantage with importance
  sampling; :func:`vocab_parallel_logprobs` gathers log-probs at given ids;
* :func:`sampling_logprobs` + :func:`importance_weights` — the trainer's log-probs of rollout
  tokens under the engine's sampling distribution, and the per-token weights (truncated or
  masked importance sampling) every loss takes as ``weights=`` for an engine whose numerics
  differ from the trainer's;
* :class:`GeneralizedJSDLogitsLoss` — ``modelopt.torch.distill`` criterion (NeMo / Megatron-Bridge
  distillation configs).
"""

from nemo_opd.loss.criterion import GeneralizedJSDLogitsLoss
from nemo_opd.loss.fused import fused_generalized_jsd
from nemo_opd.loss.importance import importance_stats, importance_weights, sampling_logprobs
from nemo_opd.loss.jsd import generalized_jsd
from nemo_opd.loss.logprobs import vocab_parallel_logprobs
from nemo_opd.loss.sampled import SampledReverseKL, sampled_token_reverse_kl
from nemo_opd.loss.topk import TeacherTopK, teacher_topk, topk_generalized_jsd

__all__ = [
    "GeneralizedJSDLogitsLoss",
    "SampledReverseKL",
    "TeacherTopK",
    "fused_generalized_jsd",
    "generalized_jsd",
    "importance_stats",
    "importance_weights",
    "sampled_token_reverse_kl",
    "sampling_logprobs",
    "teacher_topk",
    "topk_generalized_jsd",
    "vocab_parallel_logprobs",
]
