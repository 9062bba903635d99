"""The sparse losses at TP=1: vocab_parallel_logprobs, the top-k teacher + tail bucket loss and
the sampled-token reverse KL, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss_reference import (
    ref_log_softmax,
    ref_masked_mean,
    ref_sampled_loss,
    ref_topk,
    ref_topk_divergence,
)

from nemo_opd.loss import (
    TeacherTopK,
    generalized_jsd,
    sampled_token_reverse_kl,
    teacher_topk,
    topk_generalized_jsd,
    vocab_parallel_logprobs,
)

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _inputs(seed, lead, vocab, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype)
    mask = torch.rand(*lead, generator=gen) < 0.7
    return student, teacher, mask


def _close_grads(grad, ref, n_valid, tol=2e-5):
    atol = tol * ref.abs().max().item() + 1e-6 / max(n_valid, 1)
    torch.testing.assert_close(grad.double(), ref, rtol=0, atol=atol)


# ----------------------------------------------------------------- vocab_parallel_logprobs


def test_logprobs_match_log_softmax_with_repeats_and_gradient():
    student, _, mask = _inputs(0, (4, 3), 21)
    index = torch.randint(0, 21, (4, 3, 5))
    index[..., 1] = index[..., 0]  # repeated ids are allowed here
    weights = torch.randn(4, 3, 5)
    x = student.clone().requires_grad_()
    out = vocab_parallel_logprobs(x, index, temperature=1.7, chunk_tokens=2)
    (out * weights).sum().backward()
    xr = student.double().requires_grad_()
    ref = ref_log_softmax(xr, 1.7).gather(-1, index)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    _close_grads(x.grad, xr.grad, 1)


def test_logprobs_one_id_per_token_and_mask():
    student, _, mask = _inputs(1, (5, 2), 13)
    tokens = torch.randint(0, 13, (5, 2))
    out = vocab_parallel_logprobs(student, tokens, mask=mask)
    ref = ref_log_softmax(student, 1.0).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out.double(), torch.where(mask, ref, 0.0), rtol=1e-6, atol=1e-6)


def test_logprobs_gradcheck_float64():
    student, _, mask = _inputs(2, (3, 2), 9, torch.float64)
    index = torch.randint(0, 9, (3, 2, 3))
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs(x, index, temperature=0.7, mask=mask, chunk_tokens=2),
        (student.clone().requires_grad_(),))


def test_logprobs_bad_index_raises():
    student = torch.randn(3, 10)
    with pytest.raises(ValueError, match="vocabulary ids"):
        vocab_parallel_logprobs(student, torch.tensor([0, 3, 10]))
    with pytest.raises(ValueError, match="integer tensor"):
        vocab_parallel_logprobs(student, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="leading shape"):
        vocab_parallel_logprobs(student, torch.zeros(4, 1, dtype=torch.long))


# -------------------------------------------------------------------------------- top-k


def test_teacher_topk_ids_logprobs_and_precise_tail():
    _, teacher, _ = _inputs(3, (4, 3), 40)
    top = teacher_topk(teacher, 6, temperature=2.0, chunk_tokens=5)
    indices, logp, log_tail = ref_topk(teacher, 6, temperature=2.0)
    assert top.indices.dtype == torch.int64 and top.temperature == 2.0
    torch.testing.assert_close(top.indices, indices)
    torch.testing.assert_close(top.logprobs.double(), logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(top.log_tail.double(), log_tail, rtol=1e-6, atol=1e-6)
    # A tail of ~e^-40 survives (1 - Σ top-k would round it to 0 or worse).
    peaked = torch.zeros(1, 10)
    peaked[0, 0] = 45.0
    tail = teacher_topk(peaked, 1).log_tail
    assert tail.item() == pytest.approx(torch.log(torch.tensor(9.0)).item() - 45.0, rel=1e-5)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    vocab=st.integers(2, 30),
    k_fraction=st.floats(0.0, 0.95),
    beta=st.sampled_from(BETAS),
    temperature=st.sampled_from((1.0, 2.0)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    chunk_tokens=st.one_of(st.none(), st.integers(1, 5)),
    use_mask=st.booleans(),
)
def test_topk_matches_float64_reference(seed, lead, vocab, k_fraction, beta, temperature, dtype,
                                        chunk_tokens, use_mask):
    student, teacher, mask = _inputs(seed, lead, vocab, dtype)
    mask = mask if use_mask else None
    k = max(1, min(vocab - 1, int(k_fraction * vocab)))
    top = teacher_topk(teacher, k, temperature=temperature)
    # Ties in bf16 may pick either id; the chosen ones must hold the k largest logits.
    torch.testing.assert_close(teacher.double().gather(-1, top.indices),
                               torch.topk(teacher.double(), k, dim=-1).values)
    x = student.clone().requires_grad_()
    loss = topk_generalized_jsd(x, top, beta=beta, temperature=temperature, mask=mask,
                                chunk_tokens=chunk_tokens)
    loss.backward()
    xr = student.double().requires_grad_()
    ref = ref_masked_mean(ref_topk_divergence(xr, teacher, top.indices, beta, temperature), mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    n_valid = student[..., 0].numel() if mask is None else int(mask.sum())
    _close_grads(x.grad, xr.grad, n_valid, 2e-2 if dtype == torch.bfloat16 else 2e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_every_id_equals_full_divergence(beta):
    student, teacher, mask = _inputs(4, (3, 4), 12)
    top = teacher_topk(teacher, 12)
    assert torch.all(top.log_tail == float("-inf"))
    x1, x2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = topk_generalized_jsd(x1, top, beta=beta, mask=mask, continuous=True)
    loss.backward()
    full = generalized_jsd(x2, teacher, beta=beta, mask=mask, continuous=True)
    full.backward()
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(x1.grad).all()


def test_topk_properties_and_bad_input():
    student, teacher, _ = _inputs(5, (3, 2), 10)
    top = teacher_topk(student, 4)
    assert topk_generalized_jsd(student, top, beta=0.5).abs().item() < 1e-6
    x = student.clone().requires_grad_()
    loss = topk_generalized_jsd(x, teacher_topk(teacher, 4), beta=0.5,
                                mask=torch.zeros(3, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    with pytest.raises(ValueError, match="temperature"):
        topk_generalized_jsd(student, top, beta=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="beta"):
        topk_generalized_jsd(student, top, beta=2.0)
    with pytest.raises(ValueError, match="k must be"):
        teacher_topk(teacher, 11)
    with pytest.raises(ValueError, match="leading shape"):
        topk_generalized_jsd(student[:2], top, beta=0.5)
    with pytest.raises(ValueError, match="log_tail shape"):
        TeacherTopK(top.logprobs, top.log_tail[:1], top.indices, 1.0)


def test_topk_gradcheck_float64():
    student, teacher, mask = _inputs(6, (3, 2), 8, torch.float64)
    top = teacher_topk(teacher, 3, temperature=1.5)
    assert torch.autograd.gradcheck(
        lambda x: topk_generalized_jsd(x, top, beta=0.4, temperature=1.5, mask=mask),
        (student.clone().requires_grad_(),))


# ------------------------------------------------------------------ sampled-token reverse KL


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("on_policy", [True, False])
def test_sampled_reverse_kl_matches_reference(clip, on_policy):
    student, teacher, mask = _inputs(7, (6, 3), 17)
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 17, (6, 3), generator=gen)
    teacher_logp = ref_log_softmax(teacher, 0.8).gather(-1, tokens.unsqueeze(-1))[..., 0].float()
    rollout = None if on_policy else (
        ref_log_softmax(student, 0.8).gather(-1, tokens.unsqueeze(-1))[..., 0]
        + 0.3 * torch.randn(6, 3, generator=gen, dtype=torch.float64)).float()
    x = student.clone().requires_grad_()
    out = sampled_token_reverse_kl(x, tokens, teacher_logp, rollout, temperature=0.8,
                                   clip_ratio=clip, mask=mask, chunk_tokens=4)
    out.loss.backward()
    xr = student.double().requires_grad_()
    ref = ref_masked_mean(ref_sampled_loss(xr, tokens, teacher_logp, rollout, 0.8, clip), mask)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    _close_grads(x.grad, xr.grad, int(mask.sum()))
    logp = ref_log_softmax(student, 0.8).gather(-1, tokens.unsqueeze(-1))[..., 0]
    torch.testing.assert_close(out.reverse_kl.double(),
                               ref_masked_mean(logp - teacher_logp.double(), mask),
                               rtol=1e-5, atol=1e-6)
    assert not out.reverse_kl.requires_grad


def test_sampled_reverse_kl_is_zero_for_the_teacher_itself_and_when_masked():
    student, _, _ = _inputs(9, (4, 2), 11)
    tokens = torch.randint(0, 11, (4, 2))
    own = vocab_parallel_logprobs(student, tokens).detach()
    x = student.clone().requires_grad_()
    out = sampled_token_reverse_kl(x, tokens, own, None)
    out.loss.backward()
    assert out.reverse_kl.abs().item() < 1e-6 and x.grad.abs().max().item() < 1e-6
    x = student.clone().requires_grad_()
    out = sampled_token_reverse_kl(x, tokens, own, own, mask=torch.zeros(4, 2, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(x.grad == 0)


def test_sampled_reverse_kl_bad_input():
    student = torch.randn(4, 2, 11)
    tokens = torch.randint(0, 11, (4, 2))
    with pytest.raises(ValueError, match="clip_ratio"):
        sampled_token_reverse_kl(student, tokens, torch.zeros(4, 2), None, clip_ratio=0.0)
    with pytest.raises(ValueError, match="teacher_logprobs shape"):
        sampled_token_reverse_kl(student, tokens, torch.zeros(4), None)
    with pytest.raises(ValueError, match="temperature"):
        sampled_token_reverse_kl(student, tokens, torch.zeros(4, 2), None, temperature=0.0)
