"""Vocab-parallel log-probabilities at given vocabulary ids, optionally with the tail mass.

The shared engine of the sparse losses: the sampled-token reverse KL gathers ``log p`` at the
sampled token (k = 1), the top-k loss at the teacher's top-k ids plus the log of the mass of all
other ids (the tail bucket). Autograd flows through the small ``[..., k]`` outputs; the
gradient with respect to the ``[..., V/tp]`` logits is recomputed chunk by chunk in backward
from the saved per-token softmax statistics (``M``, ``δ`` of :mod:`nemo_opd.loss.softmax`), so
the forward keeps no full-size buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from nemo_opd.loss.softmax import Workspace, local_softmax, softmax_from_stats
from nemo_opd.loss.vocab_parallel import (
    VocabShard,
    agree_on_inputs,
    check_chunk_tokens,
    check_logits,
    check_temperature,
    compute_dtype,
    default_chunk_tokens,
    row_chunks,
    valid_rows,
)

__all__ = ["vocab_parallel_logprobs", "gather_logprobs"]


def _local_entries(index: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, ...]:
    """``(row, column, slot)`` of the entries of ``index [c, k]`` that fall in this shard."""
    local = index - shard.start
    row, slot = ((local >= 0) & (local < shard.local_size)).nonzero(as_tuple=True)
    return row, local[row, slot], slot


class _GatherLogprobs(torch.autograd.Function):
    """``(log p at index [N, k], log tail [N])`` of ``softmax(logits / T)`` over the global vocab.

    ``log tail`` is ``log Σ_{j ∉ index} p_j``, summed directly over the remaining ids (not
    ``log(1 − Σ p_index)``, which cancels catastrophically when the top-k hold almost all mass);
    ``-inf`` when nothing remains. With ``with_tail`` the ids of a row must be distinct.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, inv_temperature: float,
                with_tail: bool, rows: torch.Tensor | None, shard: VocabShard,
                chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = index.shape
        dtype = compute_dtype(logits.dtype)
        logp = torch.zeros(n, k, dtype=dtype, device=logits.device)
        log_tail = torch.zeros(n, dtype=dtype, device=logits.device)
        stats = torch.zeros(n, 2, dtype=dtype, device=logits.device)  # (M, δ) per token
        ws = Workspace(dtype, logits.device)
        for chunk in row_chunks(n, rows, chunk_tokens):
            idx = chunk.take(index)
            row, col, slot = _local_entries(idx, shard)
            loc = local_softmax(chunk.take(logits), inv_temperature, ws.reset())
            owned = torch.zeros(idx.shape, dtype=dtype, device=logits.device)
            owned[row, slot] = 1.0
            picked = torch.zeros_like(owned)
            picked[row, slot] = loc.shifted[row, col]  # u − m on the rank owning the id
            tail = loc.log_sum
            if with_tail:
                loc.exp[row, col] = 0.0
                tail = torch.log(loc.exp.sum(dim=-1, keepdim=True))
            # One collective per chunk: every shard's (m, log_sum, tail log_sum, owned, picked).
            table = shard.all_gather(torch.cat([loc.max, loc.log_sum, tail, owned, picked], -1))
            m, log_sums, tails = table[..., 0:1], table[..., 1:2], table[..., 2:3]
            global_max = m.amax(dim=0)
            delta = torch.logsumexp(m - global_max + log_sums, dim=0)
            # log p = (u − M) − δ = (u − m_owner) + (m_owner − M) − δ, summed over the owner.
            chunk_logp = (table[..., 3:3 + k] * (m - global_max) + table[..., 3 + k:]).sum(0)
            chunk.put(logp, chunk_logp - delta)
            chunk.put(stats, torch.cat([global_max, delta], dim=-1))
            if with_tail:
                tail_delta = torch.logsumexp(m - global_max + tails, dim=0)
                chunk.put(log_tail, (tail_delta - delta)[:, 0])
        ctx.save_for_backward(logits, index, stats, log_tail)
        ctx.inv_temperature, ctx.with_tail, ctx.rows, ctx.shard, ctx.chunk_tokens = (
            inv_temperature, with_tail, rows, shard, chunk_tokens)
        return logp, log_tail

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: torch.Tensor, grad_tail: torch.Tensor):
        # With γ = ∂L/∂logp, γ_tail = ∂L/∂log tail, Γ = Σγ + γ_tail, P_tail = exp(log tail):
        # ∂L/∂u_j = γ_j − S_j Γ for j in the index, S_j (γ_tail / P_tail − Γ) for the rest.
        logits, index, stats, log_tail = ctx.saved_tensors
        dtype = stats.dtype
        # Masked rows are never visited, so their gradient must start at zero.
        grad = torch.empty_like(logits) if ctx.rows is None else torch.zeros_like(logits)
        total = grad_logp.to(dtype).sum(dim=-1, keepdim=True)
        per_tail = torch.zeros_like(total)
        if ctx.with_tail:
            total = total + grad_tail.to(dtype).unsqueeze(-1)
            p_tail = log_tail.exp().unsqueeze(-1)
            per_tail = torch.where(p_tail > 0, grad_tail.to(dtype).unsqueeze(-1) / p_tail, 0.0)
        ws = Workspace(dtype, logits.device)
        for chunk in row_chunks(logits.shape[0], ctx.rows, ctx.chunk_tokens):
            soft = softmax_from_stats(chunk.take(logits), ctx.inv_temperature, chunk.take(stats),
                                      ws.reset())
            S = soft.exp.mul_(soft.scale())
            tot = chunk.take(total)
            g = torch.mul(S, chunk.take(per_tail) - tot, out=ws.take(S))
            row, col, slot = _local_entries(chunk.take(index), ctx.shard)
            if ctx.with_tail:
                g[row, col] = -S[row, col] * tot[row, 0]
            g.index_put_((row, col), chunk.take(grad_logp).to(dtype)[row, slot], accumulate=True)
            chunk.put(grad, g, ctx.inv_temperature)
        return grad, None, None, None, None, None, None


def gather_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_tail: bool = False,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p [..., k], log tail [...])``: the engine behind :func:`vocab_parallel_logprobs`
    and the top-k loss. ``log tail`` is ``log Σ_{j ∉ index} p_j`` when ``with_tail`` (ids of a
    token must then be distinct), else zeros. Rows where ``mask`` is False are 0."""
    check_temperature(temperature)
    check_chunk_tokens(chunk_tokens)
    if index.dim() < 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an integer tensor [..., k], got {index.dtype} "
                         f"of shape {tuple(index.shape)}")
    check_logits(logits, "logits")
    shard = agree_on_inputs(tp_group, lead=logits.shape[:-1], v_local=logits.shape[-1],
                            other_lead=index.shape[:-1], other_vocab=None, mask=mask,
                            device=logits.device, what="index")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= shard.vocab_size):
        raise ValueError(f"index values must be vocabulary ids in [0, {shard.vocab_size}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, shard.local_size)
    idx = index.reshape(flat.shape[0], -1).long()
    chunk_tokens = chunk_tokens or default_chunk_tokens(shard.local_size, flat.device)
    logp, log_tail = _GatherLogprobs.apply(flat, idx, 1.0 / float(temperature), with_tail,
                                           valid_rows(mask), shard, chunk_tokens)
    return logp.reshape(*lead, idx.shape[-1]), log_tail.reshape(lead)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Log-probabilities ``log softmax(logits / T)`` at vocabulary ids, vocab-parallel.

    Args:
        logits: ``[..., V/tp]`` this rank's vocabulary shard (TP-rank order); whole vocabulary
            when ``tp_group`` is None. Any float dtype; float32 math per chunk.
        index: ``[..., k]`` global vocabulary ids (any k, repeats allowed), or ``[...]`` for one
            id per token (the sampled tokens), replicated on every TP rank.
        temperature: > 0; divides the logits.
        mask: ``[...]``; tokens where it is False are not computed and return 0.
        tp_group: the tensor-parallel group sharding the vocabulary.
        chunk_tokens: tokens per chunk (default: cache-sized on CPU).

    Returns:
        ``[..., k]`` (or ``[...]`` for a ``[...]`` index) in float32 (float64 for float64
        logits), differentiable with respect to ``logits``; identical on every TP rank. The
        gradient is recomputed chunk by chunk in backward (1x the logits, input dtype).
    """
    squeeze = index.shape == logits.shape[:-1]
    logp, _ = gather_logprobs(logits, index.unsqueeze(-1) if squeeze else index,
                              temperature=temperature, mask=mask, tp_group=tp_group,
                              chunk_tokens=chunk_tokens)
    return logp.squeeze(-1) if squeeze else logp
