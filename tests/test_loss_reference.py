"""Independent float64 full-vocabulary references for the loss tests, and checks of the
references themselves against torch's own ``kl_div`` / ``cross_entropy``.

Everything here is written plainly from the formulas, on the whole vocabulary, in float64, with
no code from ``nemo_opd.loss``; the other ``test_loss_*`` modules import these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def _plogq(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``p * log_ratio`` with the convention ``0 * anything = 0`` (for -inf logits)."""
    return torch.where(p > 0, p * torch.where(p > 0, log_ratio, 0.0), 0.0)


def ref_divergence_from_logprobs(s: torch.Tensor, t: torch.Tensor, beta: float,
                                 continuous: bool = False) -> torch.Tensor:
    """Per-token generalized JSD from float64 log-probabilities ``[..., V]``."""
    S, T = s.exp(), t.exp()
    if beta == 0:
        return _plogq(T, t - s).sum(-1)
    if beta == 1:
        return _plogq(S, s - t).sum(-1)
    m = torch.log(beta * T + (1 - beta) * S)
    jsd = beta * _plogq(T, t - m).sum(-1) + (1 - beta) * _plogq(S, s - m).sum(-1)
    return jsd / (beta * (1 - beta)) if continuous else jsd


def ref_divergence(student: torch.Tensor, teacher: torch.Tensor, beta: float,
                   temperature: float = 1.0, continuous: bool = False) -> torch.Tensor:
    """Per-token generalized JSD of full-vocabulary logits ``[..., V]`` (float64)."""
    return ref_divergence_from_logprobs(ref_log_softmax(student, temperature),
                                        ref_log_softmax(teacher, temperature), beta, continuous)


def ref_masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.double()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def ref_topk(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    """``(indices, teacher log-probs at them, log tail)``; indices by ``torch.topk`` in float64."""
    t = ref_log_softmax(teacher, temperature)
    values, indices = torch.topk(teacher.double(), k, dim=-1)
    logp = t.gather(-1, indices)
    tail = t.exp().scatter(-1, indices, 0.0).sum(-1)
    return indices, logp, tail.log()


def ref_topk_divergence(student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor,
                        beta: float, temperature: float = 1.0,
                        continuous: bool = False) -> torch.Tensor:
    """Per-token divergence over the buckets ``indices`` + one tail bucket (float64)."""
    def buckets(logits):
        p = ref_log_softmax(logits, temperature).exp()
        top = p.gather(-1, indices)
        tail = p.scatter(-1, indices, 0.0).sum(-1, keepdim=True)
        return torch.cat([top, tail], dim=-1).log()

    return ref_divergence_from_logprobs(buckets(student), buckets(teacher), beta, continuous)


def ref_sampled_loss(student: torch.Tensor, tokens: torch.Tensor, teacher_logprobs: torch.Tensor,
                     rollout_logprobs: torch.Tensor | None, temperature: float,
                     clip: float | None) -> torch.Tensor:
    """Per-token importance-sampled reverse-KL policy-gradient loss (float64)."""
    logp = ref_log_softmax(student, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    advantage = -(logp.detach() - teacher_logprobs.double())
    old = logp.detach() if rollout_logprobs is None else rollout_logprobs.double()
    ratio = torch.exp(logp - old)
    loss = -ratio * advantage
    if clip is not None:
        loss = torch.maximum(loss, -ratio.clamp(1 - clip, 1 + clip) * advantage)
    return loss


# ------------------------------------------------------------------ checks of the references


def test_reference_kl_directions_match_torch_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # F.kl_div(input, target, log_target=True) = Σ exp(target) (target − input) = KL(target‖input)
    forward = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    reverse = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(ref_divergence(s, t, 0.0), forward)
    torch.testing.assert_close(ref_divergence(s, t, 1.0), reverse)


def test_reference_interior_is_trl_mixture_form():
    torch.manual_seed(1)
    s, t = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    beta = 0.3
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # TRL: mixture log-probs via logsumexp of the weighted log-probs.
    mix = torch.logsumexp(torch.stack([ls + torch.log(torch.tensor(1 - beta, dtype=torch.float64)),
                                       lt + torch.log(torch.tensor(beta, dtype=torch.float64))]), 0)
    kl_t = F.kl_div(mix, lt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(mix, ls, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(ref_divergence(s, t, beta), beta * kl_t + (1 - beta) * kl_s)


def test_reference_one_hot_teacher_is_cross_entropy():
    torch.manual_seed(2)
    s = torch.randn(5, 11, dtype=torch.float64)
    target = torch.randint(0, 11, (5,))
    teacher = torch.full((5, 11), float("-inf"), dtype=torch.float64)
    teacher[torch.arange(5), target] = 0.0
    torch.testing.assert_close(ref_divergence(s, teacher, 0.0),
                               F.cross_entropy(s, target, reduction="none"))


def test_reference_topk_with_all_ids_is_full_divergence():
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    indices, _, _ = ref_topk(t, 6)
    for beta in (0.0, 0.4, 1.0):
        # The tail bucket is empty (0 mass on both sides): the 0·log 0 convention applies.
        torch.testing.assert_close(ref_topk_divergence(s, t, indices, beta),
                                   ref_divergence(s, t, beta))
