"""Vocab-parallel, token-chunked generalized JSD between student and teacher logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from nemo_opd.loss.divergence import Divergence, divergence_for
from nemo_opd.loss.softmax import SoftmaxChunk, Workspace, softmax_chunks
from nemo_opd.loss.vocab_parallel import (
    VocabShard,
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

__all__ = ["generalized_jsd", "per_token_generalized_jsd", "divergence_chunk", "masked_mean"]


def divergence_chunk(zs: torch.Tensor, zt: torch.Tensor, divergence: Divergence,
                     inv_temperature: float, shard: VocabShard, ws: Workspace,
                     grad_factor: float | None = None
                     ) -> tuple[torch.Tensor, tuple[SoftmaxChunk, SoftmaxChunk], torch.Tensor,
                                torch.Tensor | None]:
    """One chunk of rows: global softmax of both sides, divergence, optionally its gradient.

    Args:
        zs, zt: student / teacher logits ``[c, V_local]`` (any float dtype; upcast here).
        ws: the chunk buffers (reset here; the returned gradient lives in one of them).
        grad_factor: if given, also return ``grad_factor · ∂D/∂u`` (``u = zs / T``, ``D``
            unscaled), compute dtype.

    Returns:
        ``(loss [c], (student, teacher) softmax chunks, sums [c, n], grad [c, V_local] | None)``;
        ``loss`` includes ``divergence.scale``; the chunks' ``stats`` and ``sums`` are global
        (two TP collectives: an all-gather and an all-reduce).
    """
    s, t = softmax_chunks([zs, zt], inv_temperature, shard, ws.reset())
    partial, a = divergence.sums(s, t, ws)
    sums = shard.all_reduce_sum(partial)
    grad = None if grad_factor is None else divergence.grad(s, t, a, sums, grad_factor, ws)
    loss = sums[:, 0] * divergence.scale if divergence.scale != 1.0 else sums[:, 0]
    return loss, (s, t), sums, grad


class _ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence ``[N]`` (``mean=False``) or its mean over the valid rows (``mean=True``,
    0-d; with ``weights [N]``, ``Σ w·D / count``); the gradient is computed chunk by chunk during
    forward.

    Memory: the only full-size buffer is the gradient ``[N, V_local]`` in the *input* dtype
    (1x the logits), filled chunk by chunk; compute-dtype temporaries exist for one chunk at a
    time. With ``mean=True`` the stored gradient already includes the ``1 / count`` factor, so a
    plain ``loss.backward()`` returns it untouched. Backward scales the buffer in place by the
    incoming gradient, so it may run once per forward (``retain_graph`` double backward raises).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, divergence: Divergence,
                inv_temperature: float, rows: torch.Tensor | None, shard: VocabShard,
                chunk_tokens: int, mean: bool, grad_enabled: bool,
                weights: torch.Tensor | None) -> torch.Tensor:
        n = student.shape[0]
        dtype = compute_dtype(student.dtype)
        per_token = torch.zeros(n, dtype=dtype, device=student.device)
        count = n if rows is None else rows.numel()
        factor = 1.0 / max(count, 1) if mean else 1.0
        grad = None
        # needs_input_grad is also True under torch.no_grad(); the caller's grad mode decides.
        if grad_enabled and ctx.needs_input_grad[0]:
            # Masked rows are never visited, so their gradient must start at zero.
            grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        ws = Workspace(dtype, student.device)
        grad_factor = divergence.scale * inv_temperature * factor if grad is not None else None
        for chunk in row_chunks(n, rows, chunk_tokens):
            loss, _, _, g = divergence_chunk(chunk.take(student), chunk.take(teacher), divergence,
                                             inv_temperature, shard, ws, grad_factor)
            chunk.put(per_token, loss)
            if g is not None:
                if weights is not None:  # a constant per token: scales its gradient row
                    g.mul_(chunk.take(weights).unsqueeze(-1))
                chunk.put(grad, g)
        ctx.grad, ctx.rows, ctx.chunk_tokens, ctx.used = grad, rows, chunk_tokens, False
        if not mean:
            return per_token
        return (per_token if weights is None else per_token * weights).sum() * factor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:
            raise RuntimeError("generalized_jsd's backward can run once per forward (its gradient "
                               "buffer is scaled in place); recompute the loss instead of "
                               "retain_graph=True")
        ctx.used = True
        grad, ctx.grad = ctx.grad, None
        if grad_output.dim() == 0:
            if grad_output.item() != 1.0:
                grad.mul_(grad_output.item())  # one rounding: computed in float, then stored
            return (grad,) + (None,) * 9
        dtype = compute_dtype(grad.dtype)
        # Per-token factors: scale row chunks in the compute dtype (one rounding to the input
        # dtype, and several times faster on CPU than a mixed-dtype broadcast over the buffer).
        for chunk in row_chunks(grad.shape[0], ctx.rows, ctx.chunk_tokens):
            rows = chunk.take(grad).to(dtype)
            chunk.put(grad, rows.mul_(chunk.take(grad_output).to(dtype).unsqueeze(-1)))
        return (grad,) + (None,) * 9


def _prepare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
             temperature: float, mask: torch.Tensor | None, tp_group: dist.ProcessGroup | None,
             chunk_tokens: int | None, continuous: bool) -> tuple:
    """Validate and flatten; the arguments of :class:`_ChunkedDivergence` but ``mean``."""
    check_beta(beta)
    check_temperature(temperature)
    check_chunk_tokens(chunk_tokens)
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    shard = agree_on_inputs(tp_group, lead=student_logits.shape[:-1],
                            v_local=student_logits.shape[-1],
                            other_lead=teacher_logits.shape[:-1],
                            other_vocab=teacher_logits.shape[-1], mask=mask,
                            device=student_logits.device)
    student = student_logits.reshape(-1, shard.local_size)
    teacher = teacher_logits.detach().reshape(-1, shard.local_size)
    chunk_tokens = chunk_tokens or default_chunk_tokens(shard.local_size, student.device)
    return (student, teacher, divergence_for(beta, continuous=continuous),
            1.0 / float(temperature), valid_rows(mask), shard, chunk_tokens)


def per_token_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    continuous: bool = False,
) -> torch.Tensor:
    """Per-token generalized JSD, shape ``[...]`` (the logits' leading shape), compute dtype.

    Same arguments and semantics as :func:`generalized_jsd`, without the reduction; tokens
    where ``mask`` is False are not computed and are 0. For callers (the ModelOpt criterion)
    that reduce themselves.
    """
    args = _prepare(student_logits, teacher_logits, beta, temperature, mask, tp_group,
                    chunk_tokens, continuous)
    return _ChunkedDivergence.apply(*args, False, torch.is_grad_enabled(), None).reshape(
        student_logits.shape[:-1])


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``per_token`` over valid tokens divided by their count (0 when there are none).

    Masked entries must already be 0 (finite); they are not multiplied, only left out of the count.
    """
    if mask is None:
        return per_token.sum() / max(per_token.numel(), 1)
    return per_token.sum() / (mask != 0).sum().clamp(min=1).to(per_token.dtype)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    continuous: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence between student and teacher, vocab-parallel.

    Per token, with ``S = softmax(student_logits / T)``, ``Tₜ = softmax(teacher_logits / T)``
    over the *global* vocabulary, ``s = log S``, ``t = log Tₜ``:

    * ``beta == 0``: forward KL ``KL(Tₜ‖S) = Σ Tₜ (t − s)``;
    * ``beta == 1``: reverse KL ``KL(S‖Tₜ) = Σ S (s − t)``;
    * ``0 < beta < 1``: ``β KL(Tₜ‖M) + (1 − β) KL(S‖M)``, ``M = β Tₜ + (1 − β) S``
      (TRL GKD's ``generalized_jsd_loss``). With ``continuous=True`` this interior value is
      divided by ``β (1 − β)``, so the loss is continuous in β on [0, 1] with the two KLs as its
      limits; the endpoints are unchanged.

    Temperature divides both logits. **No T² factor is applied**: the value is the divergence of
    the softened distributions (as in TRL and ModelOpt's ``LogitsKLLoss``); multiply by
    ``temperature ** 2`` yourself for Hinton-style gradient scale.

    Args:
        student_logits: ``[..., V/tp]`` (megatron: ``[s, b, V/tp]``), this rank's contiguous
            vocabulary shard, shards in TP-rank order; the whole vocabulary when ``tp_group`` is
            None. Any float dtype; math runs in float32 (float64 for float64 inputs) one chunk at
            a time, never on a full-size upcast.
        teacher_logits: same shape and shard; treated as a constant (no gradient).
        beta: JSD interpolation in [0, 1].
        temperature: > 0.
        mask: ``[...]`` bool (or 0/1); False tokens are skipped and excluded from the mean.
            Must be identical on every TP rank, like the tokens.
        tp_group: the tensor-parallel group over which the vocabulary is sharded.
        chunk_tokens: tokens per chunk (default: a cache-sized chunk on CPU, ~2²⁵ elements on
            CUDA).
        continuous: divide the interior JSD by ``β (1 − β)`` (see above).
        weights: ``[...]`` constant per-token weights ``w_t ≥ 0`` (e.g.
            :func:`~nemo_opd.loss.importance_weights`), replicated over TP, or None (all 1).
            They multiply each token's divergence and its gradient; the denominator stays the
            number of valid tokens (a weight-0 token still counts in it).

    Returns:
        A 0-d tensor in the compute dtype: ``Σ_valid w_t D_t / N_valid``, the (weighted) sum of
        per-token divergences over valid tokens divided by the number of valid tokens on this
        rank (tokens are replicated over TP, so every TP rank returns the same value; 0 when no
        token is valid). Not averaged over data parallel ranks.

    Memory: ``[tokens, V/tp]`` is never materialised in float32; the gradient (input dtype, 1x
    the logits) is computed during forward chunk by chunk, so backward runs once per forward.

    Raises:
        ValueError: ``beta`` outside [0, 1], ``temperature <= 0``, shape / vocabulary-shard /
            mask-shape mismatches (raised on every TP rank alike).
    """
    args = _prepare(student_logits, teacher_logits, beta, temperature, mask, tp_group,
                    chunk_tokens, continuous)
    check_weights(weights, student_logits.shape[:-1])
    flat_weights = (None if weights is None
                    else weights.reshape(-1).to(compute_dtype(student_logits.dtype)))
    return _ChunkedDivergence.apply(*args, True, torch.is_grad_enabled(), flat_weights)
