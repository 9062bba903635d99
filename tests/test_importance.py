"""Importance correction of rollout tokens (issue 14 item 4): the weight function, the trainer's
log-probs under the engine's sampling distribution, every loss with weights against float64
references (TP=1 and TP=2), equal log-probs leaving every loss unchanged, and the colocated
megatron engine's log-probs recomputed by the trainer through ``score_batch``.

The references are written plainly from the formulas in float64 (no code from
``nemo_opd.loss`` or ``nemo_opd.rollout``); the per-token loss references come from
``test_loss_reference``.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from multirank import run_ranks
from test_loss_reference import (
    ref_divergence,
    ref_log_softmax,
    ref_masked_mean,
    ref_sampled_loss,
    ref_topk,
    ref_topk_divergence,
)

from nemo_opd.config import DistillConfig, RolloutConfig
from nemo_opd.data.batch import SequenceBatch
from nemo_opd.loss import (
    fused_generalized_jsd,
    generalized_jsd,
    importance_stats,
    importance_weights,
    sampled_token_reverse_kl,
    sampling_logprobs,
    teacher_topk,
    topk_generalized_jsd,
)
from nemo_opd.rollout import RolloutBatch, SamplingParams
from nemo_opd.train.step import ImportanceCorrection, score_batch

CAP = 2.0
TEXTS = ("question: what is 12 plus 30? answer:", "the cat", "red fish and blue bird runs")


# ----------------------------------------------------------------------------- references


def ref_sampling_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                          top_k: int = 0, top_p: float = 1.0,
                          ban: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(top_p(top_k(ban(z) / T)))`` at ``tokens``, float64, whole vocabulary
    (Hugging Face's order: top-k keeps values >= the k-th largest; top-p drops the ascending
    prefix whose cumulative probability is <= 1 - top_p, never the most likely entry)."""
    u = logits.double().clone()
    if ban is not None:
        u = u.masked_fill(ban, float("-inf"))
    u = u / temperature
    if 0 < top_k < u.shape[-1]:
        kth = u.sort(dim=-1, descending=True).values[..., top_k - 1:top_k]
        u = u.masked_fill(u < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = u.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False
        u = u.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return u.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def ref_weights(logp: torch.Tensor, behaviour: torch.Tensor, mode: str, cap: float,
                mask: torch.Tensor) -> torch.Tensor:
    """Per-token weights in float64, element by element."""
    out = torch.ones(logp.shape, dtype=torch.float64)
    for i in range(logp.numel()):
        if not mask.reshape(-1)[i]:
            continue
        rho = math.exp(float(logp.reshape(-1)[i]) - float(behaviour.reshape(-1)[i]))
        if mode == "truncate":
            out.reshape(-1)[i] = min(rho, cap)
        elif mode == "mask":
            out.reshape(-1)[i] = rho if 1 / cap <= rho <= cap else 0.0
    return out


def ref_sampled_replay(student: torch.Tensor, tokens: torch.Tensor, teacher_logprobs: torch.Tensor,
                       ratio: torch.Tensor, temperature: float, clip: float | None
                       ) -> torch.Tensor:
    """Per-token PPO loss with ratio ``exp(ℓ − sg ℓ) · c`` (value ``c``), 0 where ``c = 0``."""
    logp = ref_log_softmax(student, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    advantage = teacher_logprobs.double() - logp.detach()
    r = torch.exp(logp - logp.detach()) * ratio.double()
    loss = -r * advantage
    if clip is not None:
        loss = torch.maximum(loss, -r.clamp(1 - clip, 1 + clip) * advantage)
    return torch.where(ratio > 0, loss, torch.zeros_like(loss))


def _synthetic(seed: int, shape=(6, 3), vocab: int = 29):
    """Student / teacher logits, a mask, tokens (half sampled from the student's top-k sampling
    distribution, half uniform: many outside it) and behaviour log-probs ``log μ`` = the
    float64 sampling log-probs + noise (ratios both sides of the cap and band; tokens the
    trainer's distribution excludes get a finite ``log μ``)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=gen) * 2.0
    teacher = torch.randn(*shape, vocab, generator=gen) * 2.0
    mask = torch.rand(shape, generator=gen) > 0.25
    mask[0, 0] = True
    probs = ref_log_softmax(student, 0.7).exp().reshape(-1, vocab)
    tokens = torch.multinomial(probs.float(), 1, generator=gen).reshape(shape)
    uniform = torch.randint(0, vocab, shape, generator=gen)
    tokens = torch.where(torch.rand(shape, generator=gen) > 0.5, tokens, uniform)
    exact = ref_sampling_logprobs(student, tokens, 0.7, top_k=8)
    noise = 0.8 * torch.randn(shape, generator=gen, dtype=torch.float64)
    behaviour = torch.where(torch.isfinite(exact), exact + noise, torch.full_like(exact, -3.0))
    return types.SimpleNamespace(student=student, teacher=teacher, mask=mask, tokens=tokens,
                                 behaviour=behaviour.float(), vocab=vocab)


def _weights(data, mode: str, tp_group=None, lo=0, hi=None):
    """Our weights (float32 pipeline) and the float64 reference weights of ``data``."""
    hi = data.vocab if hi is None else hi
    logp = sampling_logprobs(data.student[..., lo:hi], data.tokens, kind="sampling",
                             temperature=0.7, top_k=8, mask=data.mask, tp_group=tp_group)
    ours = importance_weights(logp, data.behaviour, correction=mode, cap=CAP, mask=data.mask)
    exact = ref_sampling_logprobs(data.student, data.tokens, 0.7, top_k=8)
    return ours, ref_weights(exact, data.behaviour.double(), mode, CAP, data.mask)


def _close_grads(grad: torch.Tensor, ref: torch.Tensor, tol: float = 2e-5) -> None:
    torch.testing.assert_close(grad.double(), ref, rtol=0, atol=tol * ref.abs().max().item() + 1e-7)


# ----------------------------------------------------------------------------- (a) weights


@pytest.mark.parametrize("mode", ["truncate", "mask", "none"])
def test_importance_weights_match_float64_reference(mode):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 4
    logp[1, 2] = float("-inf")  # excluded by the trainer's top-k: ρ = 0
    behaviour = logp.clamp(min=-5) + torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=gen) > 0.2
    mask[1, 2] = True
    weights = importance_weights(logp.float(), behaviour.float(), correction=mode, cap=CAP,
                                 mask=mask)
    ref = ref_weights(logp, behaviour, mode, CAP, mask)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    torch.testing.assert_close(weights.double(), ref, rtol=2e-6, atol=1e-7)
    assert (weights[~mask] == 1).all()  # not rollout tokens: neutral
    if mode != "none":
        assert weights[1, 2] == 0
        assert ((ref > 0) & (ref < 1)).any() and (ref[mask] != 1).sum() > 10  # a real test
    if mode == "truncate":
        assert (ref == CAP).any() and weights.max() <= CAP
    if mode == "mask":
        assert ((ref == 0) & mask).sum() > 2
    stats = importance_stats(logp.float(), behaviour.float(), weights, mask)
    rho = (logp - behaviour).exp()[mask]
    finite = torch.isfinite(logp[mask])
    assert stats["kl"] == pytest.approx(float((behaviour - logp)[mask][finite].mean()), rel=1e-5)
    assert stats["ratio_min"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(float(rho.mean()), rel=1e-5)
    assert stats["ratio_max"] == pytest.approx(float(rho.max()), rel=1e-5)
    assert stats["masked_fraction"] == pytest.approx(float((ref[mask] == 0).double().mean()))
    empty = importance_stats(logp, behaviour, weights, torch.zeros_like(mask))
    assert all(math.isnan(v) for v in empty.values())


def test_importance_weights_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="correction must be one of"):
        importance_weights(x, x, correction="clip", cap=CAP)
    with pytest.raises(ValueError, match="cap must be a finite number > 1"):
        importance_weights(x, x, correction="truncate", cap=1.0)
    with pytest.raises(ValueError, match="must have one shape"):
        importance_weights(x, torch.zeros(3, 2), correction="mask", cap=CAP)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        generalized_jsd(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), beta=1.0,
                        weights=torch.full((2, 3), -1.0))
    with pytest.raises(ValueError, match="weights shape"):
        topk_generalized_jsd(torch.zeros(2, 3, 5), teacher_topk(torch.zeros(2, 3, 5), 2),
                             beta=1.0, weights=torch.ones(3))
    with pytest.raises(ValueError, match="not both"):
        sampled_token_reverse_kl(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long),
                                 torch.zeros(2), torch.zeros(2), behaviour_ratio=torch.ones(2))
    with pytest.raises(ValueError, match="kind must be one of"):
        sampling_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), kind="greedy")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        sampling_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long),
                          kind="sampling", temperature=0.0)


# ----------------------------------------------------------------------------- log πθ of a kind


SAMPLING_CASES = [  # (kind, temperature, top_k, top_p, ban)
    ("raw", 1.0, 0, 1.0, False),
    ("raw", 0.5, 5, 0.5, True),  # raw ignores the sampling settings
    ("sampling", 0.5, 0, 1.0, False),
    ("sampling", 0.5, 6, 1.0, True),
    ("sampling", 1.3, 0, 0.8, True),
    ("sampling", 0.7, 9, 0.9, False),
]


def _ban(shape, seed=3):
    """Stop ids 0, 3, 5 banned at about half the positions."""
    banned = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    columns = torch.zeros(37, dtype=torch.bool)
    columns[[0, 3, 5]] = True
    return banned, columns


@pytest.mark.parametrize("kind, temperature, top_k, top_p, ban", SAMPLING_CASES)
def test_sampling_logprobs_match_reference(kind, temperature, top_k, top_p, ban):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 37, generator=gen) * 3
    logits[0, 0, :3] = logits[0, 0, 3]  # ties at the top
    tokens = torch.randint(0, 37, (4, 5), generator=gen)
    mask = torch.rand(4, 5, generator=gen) > 0.2
    banned, columns = _ban((4, 5))
    ours = sampling_logprobs(logits, tokens, kind=kind, temperature=temperature, top_k=top_k,
                             top_p=top_p, banned_ids=(0, 3, 5), banned=banned if ban else None,
                             mask=mask, chunk_tokens=3)
    if kind == "raw":
        ref = ref_sampling_logprobs(logits, tokens, 1.0)
    else:
        full_ban = banned[..., None] & columns if ban else None
        ref = ref_sampling_logprobs(logits, tokens, temperature, top_k, top_p, full_ban)
    ref = torch.where(mask, ref, torch.zeros_like(ref))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    if kind == "sampling" and (top_k or top_p < 1):
        assert torch.isinf(ref).sum() > 2  # tokens outside the sampling distribution
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite].double(), ref[finite], rtol=3e-7, atol=2e-6)


# ----------------------------------------------------------------------------- (b) losses, TP=1


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_full_and_fused_losses_weighted_match_reference(mode):
    data = _synthetic(5)
    weights, ref_w = _weights(data, mode)
    for beta in (0.0, 0.5, 1.0):
        x = data.student.clone().requires_grad_()
        loss = generalized_jsd(x, data.teacher, beta=beta, temperature=0.8, mask=data.mask,
                               weights=weights, chunk_tokens=4)
        loss.backward()
        xr = data.student.double().requires_grad_()
        ref = ref_masked_mean(ref_divergence(xr, data.teacher, beta, 0.8) * ref_w, data.mask)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
        _close_grads(x.grad, xr.grad)
        plain = generalized_jsd(data.student, data.teacher, beta=beta, temperature=0.8,
                                mask=data.mask)
        assert abs(plain.item() - loss.item()) > 1e-3  # the weights matter here
    # Fused: hidden @ weightᵀ logits, same weighting.
    gen = torch.Generator().manual_seed(6)
    h_s, h_t = torch.randn(6, 3, 8, generator=gen), torch.randn(6, 3, 5, generator=gen)
    w_s, w_t = torch.randn(29, 8, generator=gen), torch.randn(29, 5, generator=gen)
    hs = h_s.clone().requires_grad_()
    loss = fused_generalized_jsd(hs, w_s, h_t, w_t, beta=0.5, mask=data.mask, weights=weights)
    loss.backward()
    hr = h_s.double().requires_grad_()
    ref = ref_masked_mean(ref_divergence(hr @ w_s.double().t(), (h_t @ w_t.t()).double(), 0.5)
                          * ref_w, data.mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    _close_grads(hs.grad, hr.grad)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_topk_loss_weighted_matches_reference(mode):
    data = _synthetic(7)
    weights, ref_w = _weights(data, mode)
    top = teacher_topk(data.teacher, 6, temperature=0.8)
    indices, _, _ = ref_topk(data.teacher, 6, 0.8)
    for beta in (0.0, 0.5, 1.0):
        x = data.student.clone().requires_grad_()
        loss = topk_generalized_jsd(x, top, beta=beta, temperature=0.8, mask=data.mask,
                                    weights=weights)
        loss.backward()
        xr = data.student.double().requires_grad_()
        per_token = ref_topk_divergence(xr, data.teacher, indices, beta, 0.8)
        ref = ref_masked_mean(per_token * ref_w, data.mask)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
        _close_grads(x.grad, xr.grad)


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_sampled_loss_weighted_matches_reference(mode, clip):
    data = _synthetic(9)
    weights, ref_w = _weights(data, mode)
    teacher_lp = ref_log_softmax(data.teacher, 0.7).gather(
        -1, data.tokens.unsqueeze(-1))[..., 0].float()
    # Fresh rollouts: w_t × the on-policy PPO loss.
    x = data.student.clone().requires_grad_()
    out = sampled_token_reverse_kl(x, data.tokens, teacher_lp, None, temperature=0.7,
                                   clip_ratio=clip, mask=data.mask, weights=weights)
    out.loss.backward()
    xr = data.student.double().requires_grad_()
    ref = ref_masked_mean(ref_sampled_loss(xr, data.tokens, teacher_lp, None, 0.7, clip) * ref_w,
                          data.mask)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    _close_grads(x.grad, xr.grad)
    # Replayed rollouts: the corrected ratio is the PPO ratio.
    x = data.student.clone().requires_grad_()
    out = sampled_token_reverse_kl(x, data.tokens, teacher_lp, None, temperature=0.7,
                                   clip_ratio=clip, mask=data.mask, behaviour_ratio=weights)
    out.loss.backward()
    xr = data.student.double().requires_grad_()
    ref = ref_masked_mean(ref_sampled_replay(xr, data.tokens, teacher_lp, ref_w, 0.7, clip),
                          data.mask)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
    _close_grads(x.grad, xr.grad)
    if clip is None:  # without clipping, replay and fresh agree: w_t · (−A_t) per token
        fresh = sampled_token_reverse_kl(data.student, data.tokens, teacher_lp, None,
                                         temperature=0.7, mask=data.mask, weights=weights)
        torch.testing.assert_close(out.loss, fresh.loss, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- (c) r = 1


def test_equal_logprobs_leave_every_loss_unchanged():
    """Behaviour log-probs equal to the trainer's up to float rounding (what the colocated
    engine records): weights 1 ± 1e-6, every loss equal to the uncorrected one."""
    data = _synthetic(11)
    logp = sampling_logprobs(data.student, data.tokens, kind="sampling", temperature=0.7,
                             mask=data.mask)
    jitter = 1e-6 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    teacher_lp = ref_log_softmax(data.teacher, 0.7).gather(
        -1, data.tokens.unsqueeze(-1))[..., 0].float()
    top = teacher_topk(data.teacher, 6, temperature=0.7)
    common = dict(temperature=0.7, mask=data.mask)
    for mode in ("truncate", "mask", "none"):
        w = importance_weights(logp, logp + jitter, correction=mode, cap=CAP, mask=data.mask)
        assert (w - 1).abs().max() < 1e-5
        pairs = [
            (generalized_jsd(data.student, data.teacher, beta=0.5, weights=w, **common),
             generalized_jsd(data.student, data.teacher, beta=0.5, **common)),
            (topk_generalized_jsd(data.student, top, beta=1.0, weights=w, **common),
             topk_generalized_jsd(data.student, top, beta=1.0, **common)),
            (sampled_token_reverse_kl(data.student, data.tokens, teacher_lp, None, weights=w,
                                      clip_ratio=0.2, **common).loss,
             sampled_token_reverse_kl(data.student, data.tokens, teacher_lp, None,
                                      clip_ratio=0.2, **common).loss),
            # Replay: the corrected ratio vs the uncorrected path on the recorded log-probs.
            (sampled_token_reverse_kl(data.student, data.tokens, teacher_lp, None,
                                      behaviour_ratio=w, clip_ratio=0.2, **common).loss,
             sampled_token_reverse_kl(data.student, data.tokens, teacher_lp, logp,
                                      clip_ratio=0.2, **common).loss),
        ]
        for corrected, plain in pairs:
            torch.testing.assert_close(corrected, plain, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- batches, config


def _rollout_batch(logprobs: bool = True, kind: str = "sampling") -> SequenceBatch:
    tokens = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 10, 0, 0]])
    lengths = torch.tensor([4, 3])
    rollout = RolloutBatch(
        tokens=tokens, prompt_lengths=torch.tensor([2, 2]), prefix_lengths=torch.zeros(2),
        lengths=lengths, logprobs=torch.tensor([[0, 0, -0.5, -1.0, 0], [0, 0, -2.0, 0, 0]]),
        loss_mask=torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool),
        logprob_kind=kind, stopped=torch.zeros(2, dtype=torch.bool), pad_id=0,
        generation_seconds=0.1)
    batch = SequenceBatch.from_rollout(rollout)
    return batch if logprobs else dataclasses.replace(batch, rollout_logprobs=None,
                                                      rollout_logprob_kind=None)


def test_sequence_batch_carries_the_logprob_kind():
    batch = _rollout_batch(kind="raw")
    assert batch.rollout_logprob_kind == "raw"
    again = SequenceBatch.from_rows(batch.rows(), 0, "replay")
    assert again.rollout_logprob_kind == "raw"
    assert torch.equal(again.rollout_logprobs, batch.rollout_logprobs[:, :4])  # re-padded
    old = [{k: v for k, v in row.items() if k != "logprob_kind"} for row in batch.rows()]
    assert SequenceBatch.from_rows(old, 0, "replay").rollout_logprob_kind is None
    mixed = batch.rows()[:1] + _rollout_batch(kind="sampling").rows()[1:]
    with pytest.raises(ValueError, match="different kinds"):
        SequenceBatch.from_rows(mixed, 0, "replay")
    with pytest.raises(ValueError, match="rollout_logprob_kind"):
        dataclasses.replace(batch, rollout_logprob_kind="greedy")


def test_importance_correction_from_config():
    sampling = SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_new_tokens=2,
                              stop_token_ids=(7, 3))
    corr = ImportanceCorrection.from_config(RolloutConfig(importance="mask", importance_cap=3.0),
                                            sampling, eos_id=2)
    assert (corr.mode, corr.cap, corr.temperature, corr.top_k, corr.top_p, corr.min_new_tokens,
            corr.stop_ids, corr.kind) == ("mask", 3.0, 0.5, 20, 0.9, 2, (2, 3, 7), "sampling")
    greedy = ImportanceCorrection.from_config(RolloutConfig(), SamplingParams(temperature=0),
                                              eos_id=None)
    assert greedy.kind == "raw" and greedy.temperature == 1.0 and greedy.stop_ids == ()
    with pytest.raises(ValueError, match="ImportanceCorrection.mode"):
        ImportanceCorrection(mode="clip")


@pytest.mark.parametrize("source", ["rollout", "replay"])
def test_missing_engine_logprobs_raise_before_scoring(source):
    batch = dataclasses.replace(_rollout_batch(logprobs=False), source=source)
    models = types.SimpleNamespace()  # never touched: the check runs first
    with pytest.raises(ValueError, match="carries no engine log-probs.*rollout.importance="):
        score_batch(models, batch, DistillConfig(), loss_scale=1.0,
                    importance=ImportanceCorrection(mode="truncate"))
    if source == "replay":
        with pytest.raises(ValueError, match='"sampled" loss on replayed rollouts'):
            score_batch(models, batch, DistillConfig(loss="sampled"), loss_scale=1.0,
                        importance=ImportanceCorrection(mode="none"))


# ----------------------------------------------------------------------------- TP=2 and engine


def _tp2_loss_checks(group, rank: int) -> int:
    """Sharded sampling log-probs and every weighted loss at TP=2 against the references."""
    checks = 0
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 37, generator=gen) * 3
    tokens = torch.randint(0, 37, (4, 5), generator=gen)
    mask = torch.rand(4, 5, generator=gen) > 0.2
    banned, columns = _ban((4, 5))
    lo, hi = (0, 18) if rank == 0 else (18, 37)  # uneven shards
    for kind, temperature, top_k, top_p, ban in SAMPLING_CASES:
        ours = sampling_logprobs(logits[..., lo:hi], tokens, kind=kind, temperature=temperature,
                                 top_k=top_k, top_p=top_p, banned_ids=(0, 3, 5),
                                 banned=banned if ban else None, mask=mask, chunk_tokens=3,
                                 tp_group=group)
        ref = (ref_sampling_logprobs(logits, tokens, 1.0) if kind == "raw" else
               ref_sampling_logprobs(logits, tokens, temperature, top_k, top_p,
                                     banned[..., None] & columns if ban else None))
        ref = torch.where(mask, ref, torch.zeros_like(ref))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), kind
        finite = torch.isfinite(ref)
        torch.testing.assert_close(ours[finite].double(), ref[finite], rtol=3e-7, atol=2e-6)
        checks += 1

    data = _synthetic(13)
    lo, hi = (0, 14) if rank == 0 else (14, data.vocab)
    for mode in ("truncate", "mask"):
        weights, ref_w = _weights(data, mode, group, lo, hi)
        own, _ = _weights(data, mode)
        torch.testing.assert_close(weights, own, rtol=1e-6, atol=1e-7)  # TP=2 == TP=1
        for beta in (0.5, 1.0):
            x = data.student[..., lo:hi].clone().requires_grad_()
            loss = generalized_jsd(x, data.teacher[..., lo:hi], beta=beta, temperature=0.8,
                                   mask=data.mask, weights=weights, tp_group=group,
                                   chunk_tokens=4)
            loss.backward()
            xr = data.student.double().requires_grad_()
            ref = ref_masked_mean(ref_divergence(xr, data.teacher, beta, 0.8) * ref_w, data.mask)
            ref.backward()
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
            _close_grads(x.grad, xr.grad[..., lo:hi])
            checks += 1
        top = teacher_topk(data.teacher[..., lo:hi], 6, temperature=0.8, tp_group=group)
        indices, _, _ = ref_topk(data.teacher, 6, 0.8)
        x = data.student[..., lo:hi].clone().requires_grad_()
        loss = topk_generalized_jsd(x, top, beta=0.5, temperature=0.8, mask=data.mask,
                                    weights=weights, tp_group=group)
        loss.backward()
        xr = data.student.double().requires_grad_()
        ref = ref_masked_mean(ref_topk_divergence(xr, data.teacher, indices, 0.5, 0.8) * ref_w,
                              data.mask)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
        _close_grads(x.grad, xr.grad[..., lo:hi])
        checks += 1
        teacher_lp = ref_log_softmax(data.teacher, 0.7).gather(
            -1, data.tokens.unsqueeze(-1))[..., 0].float()
        for replay in (False, True):
            x = data.student[..., lo:hi].clone().requires_grad_()
            kwargs = {"behaviour_ratio" if replay else "weights": weights}
            out = sampled_token_reverse_kl(x, data.tokens, teacher_lp, None, temperature=0.7,
                                           clip_ratio=0.2, mask=data.mask, tp_group=group,
                                           **kwargs)
            out.loss.backward()
            xr = data.student.double().requires_grad_()
            per_token = (ref_sampled_replay(xr, data.tokens, teacher_lp, ref_w, 0.7, 0.2)
                         if replay else
                         ref_sampled_loss(xr, data.tokens, teacher_lp, None, 0.7, 0.2) * ref_w)
            ref = ref_masked_mean(per_token, data.mask)
            ref.backward()
            torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=2e-5, atol=1e-7)
            _close_grads(x.grad, xr.grad[..., lo:hi])
            checks += 2
    return checks


def _engine_checks(model_dirs: dict[str, str], prompts: list[list[int]], eos_id: int,
                   pad_id: int) -> dict:
    """At TP=2: the loss checks, then the colocated engine's log-probs recomputed by the
    trainer (directly and through score_batch) for "sampling" and "raw" kinds."""
    from megatron.core import parallel_state

    from nemo_opd.models import load_hf_gpt
    from nemo_opd.models.pipeline import model_logits
    from nemo_opd.rollout import MegatronEngine
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train.step import ScoringModels

    out: dict = {"lp_err": {}, "other_kind": {}, "no_ban": {}, "metrics": {}, "loss_diff": {},
                 "wrong": {}}
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        group = parallel_state.get_tensor_model_parallel_group()
        out["loss_checks"] = _tp2_loss_checks(group, dist_rank(group))
        student = load_hf_gpt(model_dirs["llama"], ParallelConfig(2))
        teacher = load_hf_gpt(model_dirs["qwen3"], ParallelConfig(2))
        teacher.requires_grad_(False)
        student.train()
        engine = MegatronEngine(student, pad_id=pad_id, eos_id=eos_id)
        # Stop ids the model really favours early: what greedy decoding writes first. Banned
        # for the first 3 tokens, they move the sampling distribution visibly.
        greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2))
        stops = tuple(sorted({int(greedy.tokens[r, p]) for r, p in
                              enumerate(greedy.prompt_lengths.tolist())} - {eos_id, pad_id}))
        base = SamplingParams(temperature=0.5, top_k=20, n=2, max_new_tokens=8, seed=7,
                              min_new_tokens=3, stop_token_ids=stops)
        cases = {"sampling": base, "raw": dataclasses.replace(base, logprobs="raw"),
                 "top_p": dataclasses.replace(base, top_k=0, top_p=0.9)}
        models = ScoringModels(student=student, teacher=teacher, student_tp_group=group,
                               teacher_tp_group=group, same_layout=True)
        for name, params in cases.items():
            rollout = engine.generate(prompts, params)
            assert rollout.logprob_kind == ("raw" if name == "raw" else "sampling")
            batch = SequenceBatch.from_rollout(rollout)
            corr = ImportanceCorrection.from_config(RolloutConfig(), params, eos_id)
            # (d) directly: the trainer's forward (train mode, no KV cache), its shard only.
            with torch.no_grad():
                logits = model_logits(student, batch.tokens)[:, :-1]
            targets, mask = batch.tokens[:, 1:], batch.loss_mask[:, 1:]
            engine_lp = batch.rollout_logprobs[:, 1:]
            banned = (torch.arange(1, batch.tokens.shape[1])[None, :]
                      - batch.prompt_lengths[:, None]) < params.min_new_tokens

            def recompute(kind, ban=banned, c=corr, lg=logits, t=targets, m=mask):
                return sampling_logprobs(lg, t, kind=kind, temperature=c.temperature,
                                         top_k=c.top_k, top_p=c.top_p, banned_ids=c.stop_ids,
                                         banned=ban, mask=m, tp_group=group)

            out["lp_err"][name] = (recompute(rollout.logprob_kind) - engine_lp)[mask].abs().max(
            ).item()
            other = "raw" if rollout.logprob_kind == "sampling" else "sampling"
            out["other_kind"][name] = (recompute(other) - engine_lp)[mask].abs().nan_to_num(
                posinf=1e9).max().item()
            if rollout.logprob_kind == "sampling":
                out["no_ban"][name] = (recompute("sampling", None) - engine_lp)[mask].abs(
                ).nan_to_num(posinf=1e9).max().item()
            # (c) through score_batch: ρ ≈ 1, and every loss equals the uncorrected one.
            for loss in ("full", "topk", "sampled"):
                cfg = DistillConfig(loss=loss, beta=0.5, temperature=0.5, topk=16,
                                    clip_ratio=0.2)
                for mode in ("truncate", "mask"):
                    with_ = score_batch(models, batch, cfg, loss_scale=1.0,
                                        importance=dataclasses.replace(corr, mode=mode))
                    out["metrics"][name, loss, mode] = (
                        with_.importance_kl, with_.importance_ratio_min,
                        with_.importance_ratio_mean, with_.importance_ratio_max,
                        with_.importance_masked_fraction)
                    plain = score_batch(models, batch, cfg, loss_scale=1.0)
                    out["loss_diff"][name, loss, mode] = abs(with_.loss - plain.loss) / max(
                        abs(plain.loss), 1e-6)
                    assert math.isnan(plain.importance_kl)
                if loss == "sampled":  # replayed: the corrected ratio as PPO ratio, ≈ fresh
                    replay = score_batch(models, dataclasses.replace(batch, source="replay"),
                                         cfg, loss_scale=1.0, importance=corr)
                    fresh = score_batch(models, batch, cfg, loss_scale=1.0)
                    out["loss_diff"][name, "replay"] = abs(replay.loss - fresh.loss) / max(
                        abs(fresh.loss), 1e-6)
            # A trainer on the wrong sampling temperature sees the mismatch in the metrics.
            wrong = score_batch(models, batch, DistillConfig(loss="sampled"), loss_scale=1.0,
                                importance=dataclasses.replace(corr, temperature=1.0))
            out["wrong"][name] = wrong.importance_ratio_max - wrong.importance_ratio_min
    return out


def dist_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


@pytest.mark.multirank
def test_tp2_losses_and_megatron_engine_logprobs(tiny_model_dirs, tiny_tokenizer):
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    results = run_ranks(_engine_checks, world_size=2, model_dirs=tiny_model_dirs,
                        prompts=prompts, eos_id=tiny_tokenizer.eos_token_id,
                        pad_id=tiny_tokenizer.pad_token_id, timeout=600)
    for out in results:
        assert out["loss_checks"] == 6 + 2 * (2 + 1 + 4)
        # (d) the trainer's log-probs of the engine's kind equal the engine's ...
        assert max(out["lp_err"].values()) < 3e-5, out["lp_err"]
        # ... and would not if the kind, or the stop ids banned before min_new_tokens, were
        # ignored.
        assert min(out["other_kind"].values()) > 0.1, out["other_kind"]
        assert min(out["no_ban"].values()) > 1e-3, out["no_ban"]
        # (c) colocated: ρ = 1 up to rounding, nothing dropped, every loss unchanged ...
        assert len(out["metrics"]) == 3 * 3 * 2
        for key, (kl, low, mean, high, dropped) in out["metrics"].items():
            assert abs(kl) < 1e-5 and 1 - 1e-4 < low <= mean <= high < 1 + 1e-4, (key, low, high)
            assert dropped == 0.0, key
        assert max(out["loss_diff"].values()) < 1e-4, out["loss_diff"]
        # ... while a trainer on the wrong sampling temperature sees the mismatch — for
        # sampling-kind log-probs; raw log-probs do not depend on the temperature.
        assert min(out["wrong"]["sampling"], out["wrong"]["top_p"]) > 0.1, out["wrong"]
        assert out["wrong"]["raw"] < 1e-4, out["wrong"]
