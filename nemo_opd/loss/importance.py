"""Importance correction for rollouts sampled by an engine whose numerics differ from the trainer's.

A rollout token ``x_t`` was drawn from the engine's behaviour policy ``μ`` (e.g. TensorRT-LLM or
Hugging Face on exported, dequantised weights), while the losses differentiate the trainer's
student ``πθ`` (ModelOpt fake-quant). The engine records ``log μ(x_t)``; the trainer recomputes
``log πθ(x_t)`` *under the same distribution* (:func:`sampling_logprobs`: the sampling
distribution after temperature / top-k / top-p, or the raw softmax) from the logits its loss
forward already produced, and weights each token's loss by a function of
``ρ_t = πθ(x_t) / μ(x_t)`` (:func:`importance_weights`). :func:`importance_stats` reports how far
the two policies are apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from nemo_opd.loss.vocab_parallel import (
    VocabShard,
    agree_on_inputs,
    check_chunk_tokens,
    check_logits,
    compute_dtype,
    default_chunk_tokens,
    row_chunks,
    valid_rows,
)
from nemo_opd.rollout.sampling import filter_logits

__all__ = ["IMPORTANCE_CORRECTIONS", "LOGPROB_KINDS", "importance_stats", "importance_weights",
           "sampling_logprobs"]

IMPORTANCE_CORRECTIONS = ("truncate", "mask", "none")
"""What :func:`importance_weights` does with the ratio (``RolloutConfig.importance``)."""

LOGPROB_KINDS = ("sampling", "raw")
"""Which distribution log-probs are under (:data:`nemo_opd.rollout.LogprobKind`)."""


def importance_weights(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    *,
    correction: str,
    cap: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-token importance weights of rollout tokens, from the trainer's and the engine's
    log-probs.

    Per token, ``ρ_t = exp(log πθ(x_t) − log μ(x_t))`` (``logprobs − behaviour_logprobs``) and
    ``c = cap``:

    * ``"truncate"`` (truncated importance sampling): ``w_t = min(ρ_t, c)``;
    * ``"mask"`` (masked importance sampling): ``w_t = ρ_t`` if ``1/c ≤ ρ_t ≤ c``, else 0 — the
      token is dropped;
    * ``"none"``: ``w_t = 1``.

    ``ρ_t = 0`` where the trainer's distribution excludes the token (``log πθ = −inf``, e.g.
    outside its top-k): weight 0 in both corrections. The weights are constants (computed under
    ``no_grad``, detached): the losses multiply their per-token values by them and keep their
    own denominators (the number of loss tokens), as TRL / NeMo-RL do; a dropped token still
    counts in that denominator.

    Args:
        logprobs: ``[B, T]`` (any shape) ``log πθ(x_t)``, the trainer's, of the same kind as the
            engine's (:func:`sampling_logprobs`).
        behaviour_logprobs: same shape, ``log μ(x_t)`` as the engine recorded them.
        correction: one of :data:`IMPORTANCE_CORRECTIONS`.
        cap: ``c > 1``.
        mask: same shape, the rollout tokens; where it is False the weight is 1 (prompt and
            padding positions, whose recorded log-probs are placeholders). None: every token.

    Returns:
        ``[B, T]`` weights ``≥ 0``, float32 (float64 for float64 ``logprobs``), no gradient.
    """
    if correction not in IMPORTANCE_CORRECTIONS:
        raise ValueError(f"correction must be one of {IMPORTANCE_CORRECTIONS}, got "
                         f"{correction!r}")
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 1 < cap < math.inf:
        raise ValueError(f"cap must be a finite number > 1, got {cap!r}")
    if behaviour_logprobs.shape != logprobs.shape or (mask is not None
                                                      and mask.shape != logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, behaviour_logprobs "
                         f"{tuple(behaviour_logprobs.shape)} and mask "
                         f"{None if mask is None else tuple(mask.shape)} must have one shape")
    dtype = compute_dtype(logprobs.dtype)
    with torch.no_grad():
        ratio = torch.exp(logprobs.detach().to(dtype) - behaviour_logprobs.to(dtype))
        if correction == "truncate":
            weights = ratio.clamp(max=float(cap))
        elif correction == "mask":
            keep = (ratio >= 1.0 / cap) & (ratio <= cap)
            weights = torch.where(keep, ratio, torch.zeros_like(ratio))
        else:
            weights = torch.ones_like(ratio)
        if mask is not None:
            weights = torch.where(mask.to(torch.bool), weights, torch.ones_like(weights))
    return weights


def importance_stats(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                     weights: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> dict[str, float]:
    """Engine-vs-trainer agreement over the rollout tokens (``mask``), as plain floats.

    * ``kl``: mean of ``log μ(x_t) − log πθ(x_t)``, the sampled estimate of ``KL(μ‖πθ)`` (the
      tokens were drawn from ``μ``), over tokens the trainer's distribution does not exclude
      (those have ``ρ = 0`` and show in ``ratio_min`` and ``masked_fraction``);
    * ``ratio_min`` / ``ratio_mean`` / ``ratio_max``: of ``ρ_t = πθ(x_t) / μ(x_t)``;
    * ``masked_fraction``: the fraction of tokens whose weight is 0 (dropped).

    NaN when there is no rollout token.
    """
    keys = ("kl", "ratio_min", "ratio_mean", "ratio_max", "masked_fraction")
    with torch.no_grad():
        select = (torch.ones_like(logprobs, dtype=torch.bool) if mask is None
                  else mask.to(torch.bool))
        lp = logprobs.detach().double()[select]
        mu = behaviour_logprobs.double()[select]
        if lp.numel() == 0:
            return dict.fromkeys(keys, math.nan)
        log_ratio = lp - mu
        ratio = log_ratio.exp()
        finite = torch.isfinite(log_ratio)
        kl = float(-log_ratio[finite].mean()) if bool(finite.any()) else math.nan
        return {"kl": kl, "ratio_min": float(ratio.min()), "ratio_mean": float(ratio.mean()),
                "ratio_max": float(ratio.max()),
                "masked_fraction": float((weights.detach()[select] == 0).double().mean())}


def sampling_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    banned_ids: Sequence[int] = (),
    banned: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    r"""The trainer's ``log πθ(x_t)`` under the distribution a rollout engine records.

    The engines' sampling math (:func:`nemo_opd.rollout.sample_tokens`, Hugging Face
    ``generate``'s order), per token with logits ``z`` over the global vocabulary:

    * ``kind="sampling"``: ``log_softmax(top_p(top_k(ban(z) / T)))`` at ``x_t``, where ``ban``
      sets ``banned_ids`` to ``−inf`` at the positions ``banned`` marks (stop ids before
      ``min_new_tokens``), top-k keeps the entries ``≥`` the k-th largest (ties kept) and top-p
      the smallest most-likely set reaching ``top_p`` (:func:`nemo_opd.rollout.filter_logits`).
      ``−inf`` when the filters exclude ``x_t``;
    * ``kind="raw"``: ``log_softmax(z)`` at ``x_t`` (temperature 1, nothing filtered or
      banned; the other arguments are ignored).

    Vocab-parallel: without top-p, only ``[tokens, k]`` candidates (top-k threshold) and a few
    per-token statistics cross the TP group, as in :func:`~nemo_opd.loss.teacher_topk`. Top-p
    needs each row's sorted probabilities, so with ``top_p < 1`` each chunk's logits are
    all-gathered (``[chunk, V]``, what the engine itself gathers at every decoding step) and
    filtered with the engine's own :func:`~nemo_opd.rollout.filter_logits`; at TP = 1 that is
    the path taken always (nothing to gather).

    Args:
        logits: ``[..., V/tp]`` this rank's vocabulary shard (``[B, T-1, V/tp]`` in the trainer);
            any float dtype; float32 math (float64 for float64) per chunk. Not differentiated.
        tokens: ``[...]`` global ids ``x_t``, replicated over TP.
        kind: one of :data:`LOGPROB_KINDS`.
        temperature: ``T > 0`` of the sampling distribution.
        top_k: ``≥ 0``, 0 = off. top_p: in ``(0, 1]``, 1 = off.
        banned_ids: ids removed from the sampling distribution where ``banned`` is True.
        banned: ``[...]`` bool, or None (nowhere).
        mask: ``[...]``; tokens where it is False are not computed and are 0.
        tp_group, chunk_tokens: as in :func:`~nemo_opd.loss.generalized_jsd`.

    Returns:
        ``[...]`` float32 (float64 for float64 logits), detached, identical on every TP rank.
    """
    if kind not in LOGPROB_KINDS:
        raise ValueError(f"kind must be one of {LOGPROB_KINDS}, got {kind!r}")
    if kind == "raw":
        temperature, top_k, top_p, banned = 1.0, 0, 1.0, None
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0 for sampling log-probs "
                         f"(greedy rollouts record raw log-probs), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    check_chunk_tokens(chunk_tokens)
    check_logits(logits, "logits")
    if banned is not None and tuple(banned.shape) != tuple(tokens.shape):
        raise ValueError(f"banned shape {tuple(banned.shape)} must equal tokens shape "
                         f"{tuple(tokens.shape)}")
    shard = agree_on_inputs(tp_group, lead=logits.shape[:-1], v_local=logits.shape[-1],
                            other_lead=tokens.shape, other_vocab=None, mask=mask,
                            device=logits.device, what="tokens")
    ids = list(banned_ids) if banned is not None else []
    if any(not 0 <= int(i) < shard.vocab_size for i in ids):
        raise ValueError(f"banned_ids must be vocabulary ids in [0, {shard.vocab_size}), got "
                         f"{sorted(ids)}")
    flat = logits.detach().reshape(-1, shard.local_size)
    index = tokens.reshape(-1).long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= shard.vocab_size):
        raise ValueError(f"tokens must be vocabulary ids in [0, {shard.vocab_size}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    ban_rows = None if banned is None or not ids else banned.reshape(-1).to(torch.bool)
    ban_cols = None
    if ban_rows is not None:
        ban_cols = torch.zeros(shard.local_size, dtype=torch.bool, device=flat.device)
        local = torch.tensor(ids, dtype=torch.int64, device=flat.device) - shard.start
        ban_cols[local[(local >= 0) & (local < shard.local_size)]] = True
    gathered = not shard.parallel or top_p < 1.0
    if ban_cols is not None and gathered:
        ban_cols = _global_ban(ids, shard, flat.device)
    chunk_tokens = chunk_tokens or default_chunk_tokens(
        shard.vocab_size if gathered else shard.local_size, flat.device)
    dtype = compute_dtype(flat.dtype)
    out = torch.zeros(flat.shape[0], dtype=dtype, device=flat.device)
    widths = _shard_widths(shard, flat.device) if gathered and shard.parallel else None
    with torch.no_grad():
        for chunk in row_chunks(flat.shape[0], valid_rows(mask), chunk_tokens):
            z = chunk.take(flat)
            if gathered:  # the whole row: the engine's own math
                z = z if widths is None else _whole_rows(z, shard, widths)
            u = z.to(dtype)
            if ban_rows is not None:
                u = u.masked_fill(chunk.take(ban_rows)[:, None] & ban_cols[None, :],
                                  float("-inf"))
            x = chunk.take(index)
            if gathered:
                logp = torch.log_softmax(filter_logits(u / temperature, top_k=top_k,
                                                       top_p=top_p), dim=-1)
                chunk.put(out, logp.gather(-1, x[:, None]).squeeze(-1))
            else:
                chunk.put(out, _sharded_logprobs(u / temperature, x, top_k, shard))
    return out.reshape(tokens.shape)


def _shard_widths(shard: VocabShard, device: torch.device) -> list[int]:
    """Every TP rank's ``V_local``, in rank order (shards may differ by a few entries)."""
    local = torch.tensor([shard.local_size], dtype=torch.int64, device=device)
    return [int(w) for w in shard.all_gather(local)[:, 0]]


def _whole_rows(z: torch.Tensor, shard: VocabShard, widths: list[int]) -> torch.Tensor:
    """``[c, V]`` from every rank's ``[c, V_local]``: each shard is padded to the largest for the
    all-gather (equal shapes on every rank) and the padding dropped again."""
    padded = torch.nn.functional.pad(z, (0, shard.largest_shard - shard.local_size))
    parts = shard.all_gather(padded)
    return torch.cat([part[:, :width] for part, width in zip(parts, widths, strict=True)], dim=-1)


def _global_ban(ids: list[int], shard: VocabShard, device: torch.device) -> torch.Tensor:
    cols = torch.zeros(shard.vocab_size, dtype=torch.bool, device=device)
    cols[torch.tensor(ids, dtype=torch.int64, device=device)] = True
    return cols


def _sharded_logprobs(u: torch.Tensor, x: torch.Tensor, top_k: int, shard: VocabShard
                      ) -> torch.Tensor:
    """``log_softmax(top_k(u))`` at global ids ``x [c]`` from this rank's ``u [c, V_local]``
    (temperature applied, banned entries ``-inf``); two all-gathers."""
    if 0 < top_k < shard.vocab_size:
        # The global k-th largest value: every shard's local top-k holds its share of the
        # global top-k (as a multiset), padded with -inf to the same width on every rank.
        send_k, local_k = min(top_k, shard.largest_shard), min(top_k, shard.local_size)
        values = torch.full((u.shape[0], send_k), float("-inf"), dtype=u.dtype, device=u.device)
        values[:, :local_k] = torch.topk(u, local_k, dim=-1).values
        candidates = torch.cat(list(shard.all_gather(values)), dim=-1)
        kth = torch.topk(candidates, top_k, dim=-1).values[:, -1:]
        u = u.masked_fill(u < kth, float("-inf"))
    m = u.amax(dim=-1, keepdim=True)  # -inf where this shard keeps nothing
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    log_sum = torch.log(torch.exp(u - shift).sum(dim=-1, keepdim=True))
    local = x - shard.start
    owned = ((local >= 0) & (local < shard.local_size))[:, None]
    picked = u.gather(-1, local.clamp(0, shard.local_size - 1)[:, None]) - shift
    picked = torch.where(owned, picked, torch.zeros_like(picked))
    table = shard.all_gather(torch.cat([m, log_sum, owned.to(u.dtype), picked], dim=-1))
    maxes, log_sums, owner, x_shifted = (table[..., i] for i in range(4))  # each [tp, c]
    global_max = maxes.amax(dim=0)
    delta = torch.logsumexp(maxes - global_max + log_sums, dim=0)
    # log p = (u_x − m_owner) + (m_owner − M) − δ: the small terms kept apart, as in softmax.py.
    own = torch.where(owner > 0, x_shifted + (maxes - global_max), torch.zeros_like(x_shifted))
    return own.sum(dim=0) - delta
