"""Sampled-token reverse KL as a per-token advantage (seed 003's on-policy distillation).

Only the log-probabilities of the sampled tokens are needed, so this is the cheapest loss:
one vocab-parallel gather (:func:`~nemo_opd.loss.vocab_parallel_logprobs`) on the student and
teacher log-probs that the teacher computed once for the same tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from nemo_opd.loss.logprobs import vocab_parallel_logprobs
from nemo_opd.loss.vocab_parallel import check_weights, valid_rows

__all__ = ["SampledReverseKL", "sampled_token_reverse_kl"]


class SampledReverseKL(NamedTuple):
    """What :func:`sampled_token_reverse_kl` returns."""

    loss: torch.Tensor
    """0-d: the importance-sampled policy-gradient loss to backpropagate."""
    reverse_kl: torch.Tensor
    """0-d, detached: the sampled estimate of ``KL(πθ‖π_teacher)``, mean over valid tokens of
    ``log πθ(x_t) − log π_teacher(x_t)`` (seed 003 stops training below ~0.002)."""


def sampled_token_reverse_kl(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    clip_ratio: float | None = None,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    behaviour_ratio: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> SampledReverseKL:
    """Reverse KL at the sampled tokens, used as an advantage with importance sampling.

    Per valid token ``t`` with sampled id ``x_t``, ``ℓ_t = log πθ(x_t)`` from
    ``softmax(student_logits / T)`` over the global vocabulary:

    * advantage ``A_t = −(ℓ_t − log π_teacher(x_t))`` (a constant: no gradient flows through it);
    * ratio ``r_t = exp(ℓ_t − log π_rollout(x_t))`` with ``rollout_logprobs``;
      ``r_t = exp(ℓ_t − sg ℓ_t) · c_t`` with ``behaviour_ratio = c`` (value ``c_t``, gradient
      ``c_t ∇ℓ_t``: a ratio the caller computed, e.g. like-with-like against an engine's
      sampling distribution); ``r_t = exp(ℓ_t − sg ℓ_t)`` (value 1) with neither;
    * per-token loss ``L_t = −r_t A_t``, or with ``clip_ratio = ε`` PPO's pessimistic
      ``−min(r_t A_t, clip(r_t, 1 − ε, 1 + ε) A_t)``; ``L_t = 0`` where ``r_t = 0`` (an
      importance weight of 0: the token contributes nothing, clipped branch included);
    * loss ``Σ_valid w_t L_t / N_valid`` with ``weights = w`` (1 without).

    The gradient is ``−w_t A_t r_t ∇ℓ_t``: an importance-sampled policy gradient whose
    expectation under the rollout policy is the gradient of the reverse KL
    ``KL(πθ‖π_teacher)`` (per token, no discounting, as seed 003 recommends).

    Args:
        student_logits: ``[..., V/tp]`` this rank's vocabulary shard; any float dtype.
        tokens: ``[...]`` sampled global vocabulary ids, replicated over TP.
        teacher_logprobs: ``[...]`` teacher log-probs of ``tokens`` (at the same temperature;
            e.g. :func:`~nemo_opd.loss.vocab_parallel_logprobs` on the teacher's logits).
        rollout_logprobs: ``[...]`` log-probs the rollout engine recorded when sampling
            ``tokens``; None means the tokens were sampled from the current student itself
            (``r_t = exp(ℓ_t − stopgrad ℓ_t)``: value 1, gradient ``∇ℓ_t``) or that
            ``behaviour_ratio`` gives the ratio.
        temperature: > 0, divides the student's logits; use the sampling temperature so the
            ratio compares like with like.
        clip_ratio: PPO clip ε > 0, or None for the plain importance-sampling loss.
        mask: ``[...]``; tokens where it is False are skipped and excluded from the mean.
        tp_group, chunk_tokens: as in :func:`~nemo_opd.loss.generalized_jsd`.
        behaviour_ratio: ``[...]`` constant ``c_t ≥ 0`` (not with ``rollout_logprobs``).
        weights: ``[...]`` constant per-token weights ``w_t ≥ 0`` (e.g.
            :func:`~nemo_opd.loss.importance_weights`); the denominator stays ``N_valid``.

    Returns:
        :class:`SampledReverseKL` of 0-d float32 tensors: sums over valid tokens divided by their
        number (0 when there are none), identical on every TP rank; ``reverse_kl`` unweighted.
    """
    if clip_ratio is not None and not (isinstance(clip_ratio, (int, float)) and clip_ratio > 0):
        raise ValueError(f"clip_ratio must be a number > 0 or None, got {clip_ratio!r}")
    if rollout_logprobs is not None and behaviour_ratio is not None:
        raise ValueError("give rollout_logprobs or behaviour_ratio, not both: each defines the "
                         "ratio")
    check_weights(weights, tokens.shape)
    check_weights(behaviour_ratio, tokens.shape, "behaviour_ratio")
    for name, value in (("teacher_logprobs", teacher_logprobs),
                        ("rollout_logprobs", rollout_logprobs)):
        if value is not None and value.shape != tokens.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} must equal tokens shape "
                             f"{tuple(tokens.shape)}")
    logp = vocab_parallel_logprobs(student_logits, tokens, temperature=temperature, mask=mask,
                                   tp_group=tp_group, chunk_tokens=chunk_tokens).reshape(-1)
    teacher = teacher_logprobs.reshape(-1).to(logp.dtype)
    behaviour = (logp.detach() if rollout_logprobs is None
                 else rollout_logprobs.reshape(-1).to(logp.dtype))
    c, w = (None if x is None else x.reshape(-1).to(logp.dtype)
            for x in (behaviour_ratio, weights))
    rows = valid_rows(mask)
    if rows is not None:
        logp, teacher, behaviour, c, w = (None if x is None else x.index_select(0, rows)
                                          for x in (logp, teacher, behaviour, c, w))
    advantage = teacher - logp.detach()
    ratio = torch.exp(logp - behaviour)
    if c is not None:
        ratio = ratio * c
    per_token = -ratio * advantage
    if clip_ratio is not None:
        clipped = -ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantage
        per_token = torch.maximum(per_token, clipped)
    if c is not None or rollout_logprobs is not None:
        per_token = torch.where(ratio.detach() > 0, per_token, torch.zeros_like(per_token))
    if w is not None:
        per_token = per_token * w
    count = max(logp.shape[0], 1)
    return SampledReverseKL(per_token.sum() / count, (-advantage).sum().detach() / count)
