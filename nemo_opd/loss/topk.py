"""Generalized JSD against the teacher's global top-k plus one tail bucket.

Both distributions are collapsed onto the same ``k + 1`` buckets: the teacher's top-k
vocabulary ids (over the *whole* vocabulary, across TP ranks) and one bucket for everything else,
so each stays normalised (the tail holds the remaining mass) and the divergence is the ordinary
one between two ``(k + 1)``-point distributions. With ``k`` = vocabulary size the tail is empty
and the loss equals :func:`~nemo_opd.loss.generalized_jsd`.

The teacher side is a :class:`TeacherTopK`: small ``[..., k]`` tensors a teacher on another
parallel layout can send, or that can be cached on disk for off-policy data.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from nemo_opd.loss.divergence import divergence_for
from nemo_opd.loss.jsd import masked_mean
from nemo_opd.loss.logprobs import gather_logprobs
from nemo_opd.loss.softmax import SoftmaxChunk, Workspace
from nemo_opd.loss.vocab_parallel import (
    agree_on_inputs,
    check_beta,
    check_chunk_tokens,
    check_logits,
    check_temperature,
    check_weights,
    compute_dtype,
    default_chunk_tokens,
    row_chunks,
    valid_rows,
)

__all__ = ["TeacherTopK", "teacher_topk", "topk_generalized_jsd", "per_token_topk_generalized_jsd"]


@dataclasses.dataclass(frozen=True)
class TeacherTopK:
    """The teacher's top-k log-probabilities and tail mass, per token."""

    logprobs: torch.Tensor
    """``[..., k]`` teacher log-probabilities at ``indices`` (temperature applied), descending."""
    log_tail: torch.Tensor
    """``[...]`` log of the teacher mass outside ``indices`` (``-inf`` when there is none)."""
    indices: torch.Tensor
    """``[..., k]`` int64 global vocabulary ids, distinct per token."""
    temperature: float
    """The temperature the log-probabilities were computed at; the loss must use the same."""

    def __post_init__(self) -> None:
        if self.logprobs.shape != self.indices.shape:
            raise ValueError(f"TeacherTopK.logprobs shape {tuple(self.logprobs.shape)} must equal "
                             f"indices shape {tuple(self.indices.shape)}")
        if self.log_tail.shape != self.indices.shape[:-1]:
            raise ValueError(f"TeacherTopK.log_tail shape {tuple(self.log_tail.shape)} must be the "
                             f"leading shape {tuple(self.indices.shape[:-1])}")
        check_temperature(self.temperature)


def teacher_topk(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> TeacherTopK:
    """The teacher's global top-k over the whole (TP-sharded) vocabulary, with the tail mass.

    Each rank takes its local top-k, the candidates are all-gathered (``[tp, tokens, k]`` per
    chunk, never the full vocabulary) and every rank picks the same global top-k. Log-probs and
    the tail (``log Σ`` of the other ids' probabilities, summed directly) are float32.

    Args:
        teacher_logits: ``[..., V/tp]``, this rank's vocabulary shard.
        k: number of ids to keep, ``1 <= k <= V``.
        temperature: > 0, divides the logits (the top-k ids do not depend on it).
        tp_group: the tensor-parallel group sharding the vocabulary.
        chunk_tokens: tokens per chunk.
    """
    check_temperature(temperature)
    check_chunk_tokens(chunk_tokens)
    check_logits(teacher_logits, "teacher_logits")
    shard = agree_on_inputs(tp_group, lead=teacher_logits.shape[:-1],
                            v_local=teacher_logits.shape[-1], other_lead=None, other_vocab=None,
                            mask=None, device=teacher_logits.device)
    if not isinstance(k, int) or not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k must be an integer in [1, {shard.vocab_size}] (the vocabulary "
                         f"size), got {k!r}")
    logits = teacher_logits.detach().reshape(-1, shard.local_size)
    n = logits.shape[0]
    chunk_tokens = chunk_tokens or default_chunk_tokens(shard.local_size, logits.device)
    # Every rank sends the same number of candidates (its top min(k, V_local), padded to
    # min(k, largest shard) with -inf, which ranks below any real logit, even a -inf one
    # clamped to the lowest finite float).
    send_k = min(k, shard.largest_shard)
    local_k = min(k, shard.local_size)
    dtype = compute_dtype(logits.dtype)
    indices = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    for chunk in row_chunks(n, None, chunk_tokens):
        z = chunk.take(logits)
        values = torch.full((z.shape[0], send_k), float("-inf"), dtype=dtype, device=z.device)
        ids = torch.zeros(z.shape[0], send_k, dtype=torch.int64, device=z.device)
        top_values, top_ids = torch.topk(z, local_k, dim=-1)
        values[:, :local_k] = top_values.to(dtype).clamp(min=torch.finfo(dtype).min)
        ids[:, :local_k] = top_ids + shard.start
        values, ids = shard.all_gather(values), shard.all_gather(ids)  # [tp, c, send_k]
        _, best = torch.topk(torch.cat(list(values), dim=-1), k, dim=-1)
        chunk.put(indices, torch.cat(list(ids), dim=-1).gather(-1, best))
    with torch.no_grad():
        logprobs, log_tail = gather_logprobs(logits, indices, temperature=temperature,
                                             with_tail=True, tp_group=tp_group,
                                             chunk_tokens=chunk_tokens)
    lead = teacher_logits.shape[:-1]
    return TeacherTopK(logprobs.reshape(*lead, k), log_tail.reshape(lead),
                       indices.reshape(*lead, k), float(temperature))


def per_token_topk_generalized_jsd(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    *,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    continuous: bool = False,
) -> torch.Tensor:
    """Per-token :func:`topk_generalized_jsd`, shape ``[...]``; tokens where ``mask`` is False
    are not computed and are 0."""
    check_beta(beta)
    check_temperature(temperature)
    if float(teacher.temperature) != float(temperature):
        raise ValueError(f"teacher top-k log-probs were computed at temperature "
                         f"{teacher.temperature}, the loss asks for {temperature}")
    check_logits(student_logits, "student_logits")
    agree_on_inputs(tp_group, lead=student_logits.shape[:-1], v_local=student_logits.shape[-1],
                    other_lead=teacher.indices.shape[:-1], other_vocab=None, mask=mask,
                    device=student_logits.device, what="teacher top-k")
    s_top, s_tail = gather_logprobs(student_logits, teacher.indices, temperature=temperature,
                                    with_tail=True, mask=mask, tp_group=tp_group,
                                    chunk_tokens=chunk_tokens)
    k = teacher.indices.shape[-1]
    s = torch.cat([s_top.reshape(-1, k), s_tail.reshape(-1, 1)], dim=-1)
    t = torch.cat([teacher.logprobs.reshape(-1, k), teacher.log_tail.reshape(-1, 1)],
                  dim=-1).to(device=s.device, dtype=s.dtype)
    rows = valid_rows(mask)
    if rows is not None:  # masked rows hold placeholders; keep them out of the arithmetic
        s, t = s.index_select(0, rows), t.index_select(0, rows)
    fmin = torch.finfo(s.dtype).min  # an empty tail bucket: 0 * log 0 terms must be 0, not NaN
    s, t = s.clamp(min=fmin), t.clamp(min=fmin)
    divergence = divergence_for(beta, continuous=continuous)
    sums, _ = divergence.sums(SoftmaxChunk.from_logprobs(s), SoftmaxChunk.from_logprobs(t),
                              Workspace(None))
    per_token = sums[:, 0] * divergence.scale
    if rows is not None:
        per_token = per_token.new_zeros(s_tail.numel()).index_copy(0, rows, per_token)
    return per_token.reshape(student_logits.shape[:-1])


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    *,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    continuous: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized JSD over the teacher's top-k buckets plus one tail bucket.

    Per token, with ``K`` the teacher's top-k ids, the student's buckets are ``S_K`` (its
    probabilities at ``K``, from ``softmax(student_logits / T)`` over the global vocabulary) and
    ``S_tail = Σ_{j∉K} S_j``; the teacher's ``Tₜ_K`` and ``Tₜ_tail`` likewise. The divergence is
    :func:`~nemo_opd.loss.generalized_jsd`'s (β = 0: ``KL(Tₜ‖S)``; β = 1: ``KL(S‖Tₜ)``;
    0 < β < 1: ``β KL(Tₜ‖M) + (1 − β) KL(S‖M)``, ``M = β Tₜ + (1 − β) S``; ``continuous``
    divides the interior by ``β (1 − β)``), over these ``k + 1`` buckets. No T² factor.

    Args:
        student_logits: ``[..., V/tp]`` this rank's vocabulary shard; any float dtype.
        teacher: from :func:`teacher_topk` (leading shape ``[...]``), at the same temperature.
        beta, temperature, mask, tp_group, chunk_tokens, continuous, weights: as in
            :func:`~nemo_opd.loss.generalized_jsd` (``weights`` multiply each token's divergence
            and its gradient; the denominator stays the number of valid tokens).

    Returns:
        0-d float32 tensor: ``Σ_valid w_t D_t / N_valid`` (``w_t = 1`` without weights; 0 if no
        token is valid), the same on every TP rank. Memory: the student's ``[..., V/tp]``
        gradient (input dtype) is recomputed chunk by chunk in backward; nothing full-size is
        kept from forward.
    """
    check_weights(weights, student_logits.shape[:-1])
    per_token = per_token_topk_generalized_jsd(
        student_logits, teacher, beta=beta, temperature=temperature, mask=mask,
        tp_group=tp_group, chunk_tokens=chunk_tokens, continuous=continuous)
    if weights is not None:  # masked tokens are 0 already; finite weights keep them 0
        per_token = per_token * weights.to(per_token.dtype)
    return masked_mean(per_token, mask)
