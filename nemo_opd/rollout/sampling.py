"""Token sampling from full-vocabulary logits, with the log-probs the trainer needs.

Processing order is Hugging Face ``generate``'s: banned ids (stop ids before ``min_new_tokens``)
→ temperature → top-k → top-p, so a token's sampling log-prob is
``log_softmax(top_p(top_k(mask(logits) / T)))`` at that token. Pure functions of tensors; the
random draw uses only the ``generator`` passed in, so equal logits and equal generator states give
equal tokens on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nemo_opd.rollout.engine import LogprobKind, SamplingParams

__all__ = ["SampledTokens", "filter_logits", "sample_tokens"]


class SampledTokens(NamedTuple):
    """What :func:`sample_tokens` returns."""

    tokens: torch.Tensor
    """``[rows]`` int64."""
    logprobs: torch.Tensor
    """``[rows]`` float32: log-prob of ``tokens`` (kind as returned in ``kind``)."""
    kind: LogprobKind
    """``"sampling"`` or ``"raw"`` (:data:`~nemo_opd.rollout.engine.LogprobKind`)."""


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k and then outside the top-p nucleus.

    Args:
        logits: ``[rows, V]`` float (already temperature-scaled).
        top_k: keep entries ``>=`` the k-th largest value of the row (ties kept); 0 = off.
        top_p: keep the most likely entries, in decreasing order, up to and including the one
            at which the cumulative probability of ``softmax(logits)`` reaches ``top_p``
            (at least one kept; ties at that boundary split by sort order, as in HF); 1 = off.

    Returns:
        ``[rows, V]``, a new tensor (``logits`` is not modified).
    """
    out = logits.clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        # As HF's TopPLogitsWarper: drop the ascending-sorted prefix whose mass is <= 1 - top_p.
        sorted_logits, order = torch.sort(out, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_tokens(logits: torch.Tensor, params: SamplingParams, *,
                  banned: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> SampledTokens:
    """Draw one token per row of ``logits`` as ``params`` say.

    Args:
        logits: ``[rows, V]`` full-vocabulary logits of the next position (any float dtype;
            computed in float32).
        params: temperature 0 → argmax; otherwise sample from
            ``softmax(filter_logits(mask(logits) / T, top_k, top_p))``.
        banned: ``[rows, V]`` bool, entries that may not be drawn (e.g. stop ids before
            ``min_new_tokens``), or None.
        generator: the random source of the draw (ignored for greedy).

    Raises:
        FloatingPointError: ``logits`` hold NaN or inf (a diverged model; torch's sampler would
            fail with a less telling message).

    Returns:
        :class:`SampledTokens`. Greedy and ``params.logprobs == "raw"`` record
        ``log_softmax(logits)`` (temperature 1, nothing masked); otherwise the log-prob under
        the distribution the token was drawn from.
    """
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            f"non-finite logits at a rollout position ({int(logits.isnan().sum())} NaN, "
            f"{int(logits.isinf().sum())} inf of {logits.numel()}): the model's weights have "
            "diverged")
    allowed = logits if banned is None else logits.masked_fill(banned, float("-inf"))
    if params.greedy:
        tokens = allowed.argmax(dim=-1)
    else:
        scaled = allowed / params.temperature if params.temperature != 1.0 else allowed
        if params.top_k or params.top_p < 1.0:
            scaled = filter_logits(scaled, top_k=params.top_k, top_p=params.top_p)
        sampling = torch.log_softmax(scaled, dim=-1)
        tokens = torch.multinomial(sampling.exp(), 1, generator=generator).squeeze(-1)
        if params.logprobs == "sampling":
            return SampledTokens(tokens, sampling.gather(-1, tokens[:, None]).squeeze(-1),
                                 "sampling")
    raw = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return SampledTokens(tokens, raw, "raw")
