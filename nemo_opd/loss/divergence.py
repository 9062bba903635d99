"""The generalized Jensen-Shannon divergence family as pure per-chunk math.

Notation (per token, over the vocabulary): ``S`` the student distribution, ``T`` the teacher's,
``s = log S``, ``t = log T``, both already at the loss temperature.

* β = 0: forward KL, ``KL(T‖S) = Σ T (t − s)`` (mean-seeking);
* β = 1: reverse KL, ``KL(S‖T) = Σ S (s − t)`` (mode-seeking);
* 0 < β < 1: ``β KL(T‖M) + (1 − β) KL(S‖M)`` with ``M = β T + (1 − β) S`` (TRL's GKD
  ``generalized_jsd_loss``, so β means the same as in the seeds' TRL configs).

The interior form tends to 0, not to the KL endpoints, as β → 0 or 1: ``JSD_β = β KL(T‖S) +
o(β)`` and ``(1 − β) KL(S‖T) + o(1 − β)``. With ``continuous=True`` the interior value is
divided by ``β (1 − β)``, which makes the loss continuous on all of [0, 1] (the limits are exactly
the two endpoint KLs); with ``continuous=False`` (default) it is TRL's unscaled value.

A :class:`Divergence` splits the math so it can run vocab-parallel: :meth:`Divergence.sums`
gives per-token *partial* sums over the local vocabulary slice (summed over TP ranks by the
caller), :meth:`Divergence.grad` the gradient with respect to the student's temperature-scaled
logits ``u = z / T`` once the global sums are known. Every gradient has the softmax form
``∂D/∂u_i = S_i (a_i − Σ_j S_j a_j)`` with ``a = ∂D/∂S``; the last column of ``sums`` is
``Σ_j S_j a_j`` where the gradient needs it. The same code runs on chunk buffers (a
:class:`~nemo_opd.loss.softmax.Workspace`) and out-of-place under autograd (``Workspace(None)``).
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from nemo_opd.loss.softmax import SoftmaxChunk, Workspace

__all__ = ["Divergence", "ForwardKL", "ReverseKL", "InteriorJSD", "divergence_for"]


class Divergence(abc.ABC):
    """Per-token divergence between student and teacher distributions over a vocabulary."""

    scale: float = 1.0
    """Factor on the value and the gradient (``1 / (β (1 − β))`` for the continuous interior)."""

    @abc.abstractmethod
    def sums(self, s: SoftmaxChunk, t: SoftmaxChunk,
             ws: Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Local partial sums and the gradient operand.

        Args:
            s, t: student / teacher softmax over ``[c, V]`` (``V`` local, or the top-k buckets).
            ws: where chunk-size temporaries go (``Workspace(None)``: allocate, autograd-safe).
                Chunk buffers that are no longer needed may be overwritten: afterwards ``s``
                and ``t`` are only good for :meth:`grad`.

        Returns:
            ``(sums [c, n], a)``: column 0 of ``sums`` is the (unscaled) divergence's share of
            these ``V`` entries; ``a [c, V]`` is the operand :meth:`grad` needs (or None).
        """

    @abc.abstractmethod
    def grad(self, s: SoftmaxChunk, t: SoftmaxChunk, a: torch.Tensor | None, sums: torch.Tensor,
             factor: float, ws: Workspace) -> torch.Tensor:
        """``factor · ∂D/∂u`` ``[c, V]`` (unscaled ``D``) given the *global* ``sums``; may
        overwrite ``a`` and other chunk buffers."""


class ForwardKL(Divergence):
    """β = 0: ``KL(T‖S) = Σ T (t − s)``; ``∂/∂u = S − T``."""

    def sums(self, s, t, ws):
        # t − s = (t̃ − s̃) − (offset_t − offset_s), x̃ the shifted logits.
        diff = torch.sub(t.shifted, s.shifted, out=ws.reuse(t.shifted))
        return t.dot(diff) - (t.offset - s.offset) * t.mass(), None

    def grad(self, s, t, a, sums, factor, ws):
        g = torch.mul(s.exp, s.scale() * factor, out=ws.reuse(s.shifted))
        return g.addcmul_(t.exp, t.scale() * -factor)


class ReverseKL(Divergence):
    """β = 1: ``KL(S‖T) = Σ S (s − t)``; ``∂/∂u = S (s − t − KL)``."""

    def sums(self, s, t, ws):
        a = torch.sub(s.shifted, t.shifted, out=ws.reuse(t.shifted)).sub_(s.offset - t.offset)
        return s.dot(a), a

    def grad(self, s, t, a, sums, factor, ws):
        return a.sub_(sums[:, -1:]).mul_(s.exp).mul_(s.scale() * factor)


@dataclasses.dataclass(frozen=True)
class InteriorJSD(Divergence):
    """0 < β < 1: ``β Σ T (t − m) + (1 − β) Σ S (s − m)``, ``m = log(β T + (1 − β) S)``.

    ``∂D/∂S = (1 − β)(s − m)`` (the ``+1`` terms of the two entropies cancel), so
    ``∂/∂u = (1 − β) S (s − m − Σ S (s − m))``. ``M`` gets the smallest normal float added
    before the log: where both distributions underflow to 0 the terms are 0, not NaN.
    """

    beta: float
    scale: float = 1.0

    def sums(self, s, t, ws):
        tiny = torch.finfo(s.exp.dtype).tiny
        mix = torch.addcmul(s.exp.new_full((1, 1), tiny), s.exp, s.scale() * (1.0 - self.beta),
                            out=ws.take(s.exp))
        m = mix.addcmul_(t.exp, t.scale() * self.beta).log_()
        # With x̃ the shifted logits: s − m = (s̃ − m) − offset_s, and Σ S = mass.
        a = torch.sub(s.shifted, m, out=ws.take(m))
        kl_s = s.dot(a) - s.offset * s.mass()
        kl_t = t.dot(torch.sub(t.shifted, m, out=ws.reuse(m))) - t.offset * t.mass()
        return torch.cat([self.beta * kl_t + (1.0 - self.beta) * kl_s, kl_s], dim=-1), a

    def grad(self, s, t, a, sums, factor, ws):
        # a holds s̃ − m; the gradient operand is s − m − Σ S (s − m).
        a = a.sub_(s.offset + sums[:, -1:]).mul_(s.exp)
        return a.mul_(s.scale() * ((1.0 - self.beta) * factor))


def divergence_for(beta: float, *, continuous: bool = False) -> Divergence:
    """The divergence for ``beta`` (see the module docstring for ``continuous``)."""
    beta = float(beta)
    if beta == 0.0:
        return ForwardKL()
    if beta == 1.0:
        return ReverseKL()
    return InteriorJSD(beta, 1.0 / (beta * (1.0 - beta)) if continuous else 1.0)
