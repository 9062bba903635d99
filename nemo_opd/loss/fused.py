"""Generalized JSD fused with the (vocab-parallel) output layers: no ``[tokens, V/tp]`` logits.

Takes the final hidden states and the output-layer weights of student and teacher and computes
the loss of :func:`~nemo_opd.loss.generalized_jsd` on ``hidden @ weightᵀ`` without ever holding
the logits for all tokens:

* forward: token blocks; each block's logits ``[block, V/tp]`` (input dtype, as the model's
  output layer would produce them) are reduced to per-token log-sum-exps and divergence sums
  (a few floats per token), then dropped;
* backward: vocabulary blocks; for each block of ``V/tp`` columns the logits of every token are
  recomputed tile by tile, turned into the gradient with the saved per-token statistics, and
  multiplied straight into ``∂/∂weight`` (written once per block, input dtype, float32
  accumulation) and ``∂/∂hidden`` (float32 accumulator ``[tokens, hidden]``).

Extra memory is one logits block per model in forward and the weight gradient plus one tile in
backward. The price is recomputing the two logits matmuls once (six matmuls instead of four).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from nemo_opd.loss.divergence import Divergence, divergence_for
from nemo_opd.loss.jsd import divergence_chunk, masked_mean
from nemo_opd.loss.softmax import Workspace, softmax_from_stats
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

__all__ = ["fused_generalized_jsd"]

# Elements of one input-dtype logits block in forward (64 MiB in bf16).
_BLOCK_ELEMENTS = 2**25


class _FusedDivergence(torch.autograd.Function):
    """Per-token divergence ``[N]`` of ``hidden @ weightᵀ`` logits; see the module docstring."""

    @staticmethod
    def forward(ctx, h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                divergence: Divergence, inv_temperature: float, rows: torch.Tensor | None,
                shard: VocabShard, block_tokens: int) -> torch.Tensor:
        n = h_s.shape[0]
        dtype = compute_dtype(h_s.dtype)
        chunk_tokens = default_chunk_tokens(shard.local_size, h_s.device)
        per_token = torch.zeros(n, dtype=dtype, device=h_s.device)
        stats = torch.zeros(n, 2, 2, dtype=dtype, device=h_s.device)  # token, side, (M, δ)
        sums = None
        ws = Workspace(dtype, h_s.device)
        for block in row_chunks(n, rows, block_tokens):
            zs = block.take(h_s) @ w_s.t()
            zt = block.take(h_t) @ w_t.t()
            results = [divergence_chunk(chunk.take(zs), chunk.take(zt), divergence,
                                        inv_temperature, shard, ws)
                       for chunk in row_chunks(zs.shape[0], None, chunk_tokens)]
            block.put(per_token, torch.cat([r[0] for r in results]))
            block.put(stats, torch.cat([torch.stack([r[1][0].stats, r[1][1].stats], dim=1)
                                        for r in results]))
            block_sums = torch.cat([r[2] for r in results])
            if sums is None:
                sums = torch.zeros(n, block_sums.shape[1], dtype=dtype, device=h_s.device)
            block.put(sums, block_sums)
        ctx.save_for_backward(h_s, w_s, h_t, w_t, stats, sums)
        ctx.divergence, ctx.inv_temperature, ctx.rows, ctx.shard, ctx.block_tokens = (
            divergence, inv_temperature, rows, shard, block_tokens)
        return per_token

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per_token: torch.Tensor):
        h_s, w_s, h_t, w_t, stats, sums = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v_local = h_s.shape[0], w_s.shape[0]
        dtype = stats.dtype
        divergence, inv_t = ctx.divergence, ctx.inv_temperature
        grad_h = torch.zeros(n, h_s.shape[1], dtype=dtype, device=h_s.device) if need_h else None
        grad_w = torch.empty_like(w_s) if need_w else None
        n_valid = n if ctx.rows is None else ctx.rows.numel()
        if sums is None or n_valid == 0:  # no valid token: all gradients are zero
            return (grad_h.to(h_s.dtype) if need_h else None,
                    grad_w.zero_() if need_w else None) + (None,) * 7
        # Tiles of [block_tokens, vocab_block]: about one cache-sized chunk of elements.
        tile_rows = min(ctx.block_tokens, n_valid)
        vocab_block = max(1, default_chunk_tokens(tile_rows, h_s.device))
        ws = Workspace(dtype, h_s.device)
        for v0 in range(0, v_local, vocab_block):
            ws_b, wt_b = w_s[v0:v0 + vocab_block], w_t[v0:v0 + vocab_block]
            gw_acc = None
            for block in row_chunks(n, ctx.rows, ctx.block_tokens):
                hs = block.take(h_s)
                block_stats = block.take(stats)
                s = softmax_from_stats(hs @ ws_b.t(), inv_t, block_stats[:, 0], ws.reset())
                t = softmax_from_stats(block.take(h_t) @ wt_b.t(), inv_t, block_stats[:, 1], ws)
                _, a = divergence.sums(s, t, ws)
                g = divergence.grad(s, t, a, block.take(sums), divergence.scale * inv_t, ws)
                g = g.mul_(block.take(grad_per_token).to(dtype).unsqueeze(-1)).to(w_s.dtype)
                if need_h:
                    block_grad = (g @ ws_b).to(dtype)
                    if isinstance(block.index, slice):
                        grad_h[block.index] += block_grad
                    else:
                        grad_h.index_add_(0, block.index, block_grad)
                if need_w:
                    part = (g.t() @ hs).to(dtype)
                    gw_acc = part if gw_acc is None else gw_acc.add_(part)
            if need_w:
                grad_w[v0:v0 + vocab_block] = gw_acc
        if need_h:
            # Hidden states are replicated over TP; each rank's vocab shard contributes a part
            # (what ColumnParallelLinear's input all-reduce does for an unfused output layer).
            grad_h = ctx.shard.all_reduce_sum(grad_h).to(h_s.dtype)
        return (grad_h, grad_w) + (None,) * 7


def fused_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    continuous: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~nemo_opd.loss.generalized_jsd` of ``student_hidden @ student_weightᵀ`` and
    ``teacher_hidden @ teacher_weightᵀ``, without materialising the logits.

    Same formula, KL directions, temperature handling (no T² factor), ``continuous`` option,
    mask and reduction as :func:`~nemo_opd.loss.generalized_jsd`; the logits are those of a
    bias-free output layer (megatron's GPT ``output_layer``), computed in the input dtype.

    Args:
        student_hidden: ``[..., H_s]`` final hidden states (megatron ``[s, b, H_s]``),
            replicated over TP (no sequence parallelism).
        student_weight: ``[V/tp, H_s]`` this rank's vocabulary rows of the output layer.
            A vocabulary padded for TP (:mod:`nemo_opd.models.vocab`) is not masked here: its
            zero rows would count as ids with logit 0, so use :func:`generalized_jsd` on the
            model's (masked) logits for such models.
        teacher_hidden: ``[..., H_t]``; teacher_weight: ``[V/tp, H_t]`` (same vocab shard);
            treated as constants (no gradient). Each side's hidden states and weight share a
            dtype; the math runs in float32 (float64 if the student is float64).
        beta, temperature, mask, tp_group, continuous, weights: as in ``generalized_jsd``
            (``Σ_valid w_t D_t / N_valid``).
        chunk_tokens: tokens per matmul block (default: ~2²⁵ logits elements per block).

    Returns:
        0-d tensor (float32; float64 for float64 inputs), identical on every TP rank.

    Gradients: ``∂/∂student_weight`` is this rank's shard; ``∂/∂student_hidden`` is summed over
    the TP group (the hidden states are replicated), i.e. the complete gradient on every rank.
    """
    check_beta(beta)
    check_temperature(temperature)
    for name, tensor in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden),
                         ("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        check_logits(tensor, name)
    for side, hidden, weight in (("student", student_hidden, student_weight),
                                 ("teacher", teacher_hidden, teacher_weight)):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{side}_weight must be [V/tp, {hidden.shape[-1]}] to match "
                             f"{side}_hidden's hidden size, got {tuple(weight.shape)}")
        if weight.dtype != hidden.dtype:
            raise ValueError(f"{side}_weight dtype {weight.dtype} must equal {side}_hidden's "
                             f"{hidden.dtype} (the output layer runs in one dtype)")
    check_chunk_tokens(chunk_tokens)
    check_weights(weights, student_hidden.shape[:-1])
    shard = agree_on_inputs(tp_group, lead=student_hidden.shape[:-1],
                            v_local=student_weight.shape[0], other_lead=teacher_hidden.shape[:-1],
                            other_vocab=teacher_weight.shape[0], mask=mask,
                            device=student_hidden.device, what="teacher_hidden / teacher_weight")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    block_tokens = chunk_tokens or max(1, _BLOCK_ELEMENTS // shard.local_size)
    per_token = _FusedDivergence.apply(h_s, student_weight, h_t, teacher_weight.detach(),
                                       divergence_for(beta, continuous=continuous),
                                       1.0 / float(temperature), valid_rows(mask), shard,
                                       block_tokens)
    per_token = per_token.reshape(student_hidden.shape[:-1])
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
    return masked_mean(per_token, mask)
