"""Per-chunk softmax over a TP-sharded vocabulary: the statistics every loss starts from.

For a chunk of logits ``z [c, V/tp]`` at temperature ``T`` (``u = z / T``) each token's global
softmax is described by two numbers: ``M``, the global maximum of ``u``, and
``δ = log Σ_v exp(u_v − M)`` over the whole vocabulary. Then ``log p = (u − M) − δ``.

Numerics, and why not a single log-sum-exp: for a confident token ``log p`` is a tiny number,
and ``u − lse`` computed from a rounded ``lse ≈ u`` loses it (float32's ulp at 20 is 2e-6, the
size of the whole ``log p``). Keeping ``u − M`` (exact when close) and the small ``δ`` apart
gives the precision of ``torch.log_softmax``; the softmax gradients downstream depend on it.

Logits are clamped to ``-1e38 · min(1, T)`` as they are upcast, so ``-inf`` logits (masked
vocabulary entries) become a finite number whose probability is exactly 0 and every
``0 · log 0`` term is 0 instead of NaN.

Speed (CPU): chunk-sized float32 buffers come from a :class:`Workspace` reused across chunks
(fresh multi-megabyte allocations cost page faults on every chunk), and probabilities are never
normalised element by element: sums over the vocabulary take the per-row factor afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nemo_opd.loss.vocab_parallel import VocabShard

__all__ = [
    "SoftmaxChunk",
    "Workspace",
    "local_softmax",
    "normalise",
    "rowdot",
    "softmax_chunks",
    "softmax_from_stats",
]

_LOGIT_FLOOR = -1e38


class Workspace:
    """A pool of chunk-sized buffers handed out in order and reused for every chunk.

    ``take(like)`` returns a fresh-for-this-chunk buffer shaped like ``like``, ``reuse(buffer)``
    the buffer itself; ``reset()`` starts the next chunk. ``Workspace(None)`` hands out None,
    which torch's ``out=`` reads as "allocate": the same formulas then run out-of-place (for
    autograd on small tensors).
    """

    def __init__(self, dtype: torch.dtype | None, device: torch.device | None = None) -> None:
        self._dtype, self._device = dtype, device
        self._flat: list[torch.Tensor] = []   # the storage of each buffer
        self._views: list[torch.Tensor] = []  # its view in the shape asked for last
        self._next = 0

    def reset(self) -> Workspace:
        self._next = 0
        return self

    def reuse(self, buffer: torch.Tensor) -> torch.Tensor | None:
        """``buffer`` itself as an ``out=`` target (a chunk buffer whose content is no longer
        needed), or None (allocate) for ``Workspace(None)``."""
        return None if self._dtype is None else buffer

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        if self._dtype is None:
            return None
        shape, i = like.shape, self._next
        self._next += 1
        if i == len(self._flat):
            self._flat.append(torch.empty(like.numel(), dtype=self._dtype, device=self._device))
            self._views.append(self._flat[i].view(shape))
        elif self._views[i].shape != shape:  # a chunk of another size: re-view (or grow)
            if self._flat[i].numel() < like.numel():
                self._flat[i] = torch.empty(like.numel(), dtype=self._dtype, device=self._device)
            self._views[i] = self._flat[i][:like.numel()].view(shape)
        return self._views[i]


@dataclasses.dataclass
class SoftmaxChunk:
    """One side's softmax over a chunk, kept unnormalised: per row,
    ``log p = shifted − offset`` and ``p = exp · exp(−offset)``.

    Divergences read it through :meth:`dot` and :meth:`mass`, which apply the per-row factor to
    a row sum instead of normalising every element (two full passes saved per side).
    """

    shifted: torch.Tensor
    """``[c, V]``: ``u − m`` with ``m`` a per-row shift (local max, global max, or 0)."""
    exp: torch.Tensor
    """``exp(shifted)``."""
    offset: torch.Tensor | None
    """``[c, 1]``: what ``shifted`` lacks to be ``log p`` (set by :func:`normalise`)."""
    max: torch.Tensor | None = None
    """Local maximum ``m`` of ``u``."""
    log_sum: torch.Tensor | None = None
    """``log Σ_local exp(u − m)``."""
    global_max: torch.Tensor | None = None
    """``M`` (set by :func:`normalise`)."""
    delta: torch.Tensor | None = None
    """``δ`` (set by :func:`normalise`)."""
    _scale: torch.Tensor | None = None

    @classmethod
    def from_logprobs(cls, logp: torch.Tensor) -> SoftmaxChunk:
        """Already-normalised log-probabilities (small tensors; autograd-friendly)."""
        zero = torch.zeros_like(logp[..., :1])
        return cls(logp, logp.exp(), zero, _scale=torch.ones_like(zero))

    @property
    def stats(self) -> torch.Tensor:
        """``[c, 2]``: the global ``(M, δ)`` per token, what :func:`softmax_from_stats` needs
        to recompute this softmax later."""
        return torch.cat([self.global_max, self.delta], dim=-1)

    def scale(self) -> torch.Tensor:
        """``exp(−offset)`` ``[c, 1]``: ``p = exp · scale``."""
        if self._scale is None:
            self._scale = torch.exp(-self.offset)
        return self._scale

    def dot(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_v p_v x_v`` over these entries, ``[c, 1]``."""
        return rowdot(self.exp, x) * self.scale()

    def mass(self) -> torch.Tensor | float:
        """``Σ_v p_v`` over these entries, ``[c, 1]`` (the float 1.0 when they are the whole
        vocabulary of a chunk from :func:`local_softmax`)."""
        if self.log_sum is None:
            return self.exp.sum(dim=-1, keepdim=True) * self.scale()
        if self.offset is self.log_sum:  # not vocab-parallel: this shard is everything
            return 1.0
        return torch.exp(self.log_sum - self.offset)


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Σ_v x[:, v] y[:, v]`` as ``[c, 1]``. A one-row chunk (the CPU default at large vocab
    sizes) goes through BLAS, about twice as fast as multiply-then-sum there."""
    if x.shape[0] == 1:
        return torch.mm(x, y.transpose(0, 1))
    return torch.sum(x * y, dim=-1, keepdim=True)


def local_softmax(z: torch.Tensor, inv_temperature: float, ws: Workspace) -> SoftmaxChunk:
    """Upcast one chunk into workspace buffers and compute its local pieces (one exp)."""
    u = ws.take(z)
    u.copy_(z).clamp_(min=_LOGIT_FLOOR * min(1.0, 1.0 / inv_temperature))
    if inv_temperature != 1.0:
        u.mul_(inv_temperature)
    m = u.amax(dim=-1, keepdim=True)
    e = torch.exp(u.sub_(m), out=ws.take(u))
    return SoftmaxChunk(u, e, offset=None, max=m, log_sum=torch.log(e.sum(dim=-1, keepdim=True)))


def normalise(chunks: Sequence[SoftmaxChunk], shard: VocabShard) -> None:
    """Set every chunk's global ``stats`` and ``offset`` from all shards' ``(m, log_sum)``
    (one all-gather for all the chunks)."""
    if not shard.parallel:
        for chunk in chunks:
            chunk.global_max, chunk.delta, chunk.offset = chunk.max, chunk.log_sum, chunk.log_sum
        return
    maxes = torch.stack([chunk.max for chunk in chunks])
    log_sums = torch.stack([chunk.log_sum for chunk in chunks])
    table = shard.all_gather(torch.stack([maxes, log_sums]))  # [tp, 2, n, c, 1]
    global_max = table[:, 0].amax(dim=0)
    delta = torch.logsumexp(table[:, 0] - global_max + table[:, 1], dim=0)
    offsets = (global_max - maxes) + delta  # δ on the shard holding the maximum
    for i, chunk in enumerate(chunks):
        chunk.global_max, chunk.delta, chunk.offset = global_max[i], delta[i], offsets[i]


def softmax_chunks(chunks: Sequence[torch.Tensor], inv_temperature: float, shard: VocabShard,
                   ws: Workspace) -> list[SoftmaxChunk]:
    """:func:`local_softmax` of several ``[c, V/tp]`` chunks, then :func:`normalise` them."""
    sides = [local_softmax(z, inv_temperature, ws) for z in chunks]
    normalise(sides, shard)
    return sides


def softmax_from_stats(z: torch.Tensor, inv_temperature: float, stats: torch.Tensor,
                       ws: Workspace) -> SoftmaxChunk:
    """The softmax of a ``[c, V_block]`` block of logits whose tokens' global statistics
    ``stats [c, 2]`` (``M``, ``δ``) were saved in forward; no collective (recomputation)."""
    u = ws.take(z)
    u.copy_(z).clamp_(min=_LOGIT_FLOOR * min(1.0, 1.0 / inv_temperature))
    if inv_temperature != 1.0:
        u.mul_(inv_temperature)
    u.sub_(stats[:, 0:1])
    return SoftmaxChunk(u, torch.exp(u, out=ws.take(u)), offset=stats[:, 1:2])
