"""fused_generalized_jsd (hidden states + output weights, no logits) at TP=1: equal to the
unfused loss on ``hidden @ weightᵀ``, gradients included, and never holding full logits."""

from __future__ import annotations

import pytest
import torch
from test_loss_jsd import _LargestAllocations
from test_loss_reference import ref_divergence, ref_masked_mean

from nemo_opd.loss import fused_generalized_jsd, generalized_jsd

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _inputs(seed, lead, hidden_s, hidden_t, vocab, dtype):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return (rand(*lead, hidden_s), rand(vocab, hidden_s, scale=0.5), rand(*lead, hidden_t),
            rand(vocab, hidden_t, scale=0.5), torch.rand(*lead, generator=gen) < 0.7)


def _run(fn, h_s, w_s, *rest, **kwargs):
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss = fn(h, w, *rest, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _unfused(h_s, w_s, h_t, w_t, **kwargs):
    return generalized_jsd(h_s @ w_s.t(), h_t @ w_t.t(), **kwargs)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_unfused(beta, dtype):
    h_s, w_s, h_t, w_t, mask = _inputs(0, (5, 3), 8, 12, 37, dtype)
    for chunk_tokens, temperature, use_mask in ((None, 1.0, True), (4, 2.0, False),
                                                (1, 1.0, True)):
        kwargs = dict(beta=beta, temperature=temperature, mask=mask if use_mask else None)
        fused = _run(fused_generalized_jsd, h_s, w_s, h_t, w_t, chunk_tokens=chunk_tokens,
                     **kwargs)
        unfused = _run(_unfused, h_s, w_s, h_t, w_t, **kwargs)
        torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(fused[1:], unfused[1:], strict=True):
            assert got.dtype == dtype
            # bf16: the two paths round the bf16 logits-gradient in different places.
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got.float(), want.float(), rtol=0,
                                       atol=tol * want.abs().max().item())


def test_fused_matches_float64_reference_and_gradcheck():
    h_s, w_s, h_t, w_t, mask = _inputs(1, (4, 2), 5, 6, 9, torch.float64)
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss = fused_generalized_jsd(h, w, h_t, w_t, beta=0.3, temperature=1.5, mask=mask,
                                 chunk_tokens=3)
    ref = ref_masked_mean(ref_divergence(h @ w.t(), h_t @ w_t.t(), 0.3, 1.5), mask)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_generalized_jsd(a, b, h_t, w_t, beta=0.3, temperature=1.5, mask=mask,
                                           chunk_tokens=3),
        (h, w))


def test_fused_gradient_only_where_asked_and_teacher_constant():
    h_s, w_s, h_t, w_t, _ = _inputs(2, (6,), 4, 4, 10, torch.float32)
    h = h_s.clone().requires_grad_()
    t_h, t_w = h_t.clone().requires_grad_(), w_t.clone().requires_grad_()
    fused_generalized_jsd(h, w_s, t_h, t_w, beta=0.5).backward()
    assert h.grad is not None and t_h.grad is None and t_w.grad is None


def test_fused_all_masked_is_zero():
    h_s, w_s, h_t, w_t, _ = _inputs(3, (3, 2), 4, 4, 10, torch.bfloat16)
    loss, grad_h, grad_w = _run(fused_generalized_jsd, h_s, w_s, h_t, w_t, beta=0.5,
                                mask=torch.zeros(3, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and torch.all(grad_h == 0) and torch.all(grad_w == 0)


def test_fused_never_holds_full_logits():
    tokens, vocab, hidden, block = 64, 200, 8, 4
    h_s, w_s, h_t, w_t, mask = _inputs(4, (tokens,), hidden, hidden, vocab, torch.bfloat16)
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    with _LargestAllocations() as seen:
        fused_generalized_jsd(h, w, h_t, w_t, beta=0.5, mask=mask, chunk_tokens=block).backward()
    # The largest buffers are the weight gradient [V, H] and one [block, V] logits block; an
    # unfused pipeline would hold [tokens, V] = 12,800-element logits.
    assert max(seen.largest.values()) <= max(vocab * hidden, block * vocab), seen.largest


def test_fused_bad_input():
    h_s, w_s, h_t, w_t, _ = _inputs(5, (3,), 4, 6, 10, torch.float32)
    with pytest.raises(ValueError, match="student_weight must be"):
        fused_generalized_jsd(h_s, w_s[:, :3], h_t, w_t, beta=0.5)
    with pytest.raises(ValueError, match="vocabulary shard mismatch"):
        fused_generalized_jsd(h_s, w_s, h_t, w_t[:9], beta=0.5)
    with pytest.raises(ValueError, match="leading shape"):
        fused_generalized_jsd(h_s, w_s, h_t[:2], w_t, beta=0.5)
    with pytest.raises(ValueError, match="dtype"):
        fused_generalized_jsd(h_s, w_s.double(), h_t, w_t, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        fused_generalized_jsd(h_s, w_s, h_t, w_t, beta=-1.0)
