"""generalized_jsd at TP=1: values and gradients against the float64 reference, properties,
chunking, memory, and bad input. (TP=2 lives in test_loss_tp2.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss_reference import ref_divergence, ref_masked_mean
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_opd.loss import generalized_jsd
from nemo_opd.loss.jsd import per_token_generalized_jsd

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 2.0)


def _inputs(seed, lead, vocab, dtype, scale=3.0, mask_p=0.7):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype)
    mask = torch.rand(*lead, generator=gen) < mask_p
    return student, teacher, mask


def _check_against_reference(student, teacher, mask, beta, temperature, chunk_tokens=None,
                             continuous=False):
    x = student.clone().requires_grad_()
    loss = generalized_jsd(x, teacher, beta=beta, temperature=temperature, mask=mask,
                           chunk_tokens=chunk_tokens, continuous=continuous)
    loss.backward()
    xr = student.double().requires_grad_()
    ref = ref_masked_mean(ref_divergence(xr, teacher, beta, temperature, continuous), mask)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert x.grad.dtype == student.dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
    # Gradients are stored in the input dtype: bf16 keeps ~3 significant digits. The softmax
    # gradient S_i (a_i - Σ S a) cancels in float32 when one token dominates, so there is also
    # an absolute floor of float32 precision on the per-token gradient (divided by the count):
    # a few float32 ulps of the log-ratios a, which are as large as the (tempered) logit spans
    # (found by hypothesis: logits spanning ±26 left a 2.7e-6 float32 error at the argmax).
    n_valid = student[..., 0].numel() if mask is None else max(int(mask.sum()), 1)
    tol = 2e-2 if student.dtype == torch.bfloat16 else 2e-5
    span = float((student.amax() - student.amin()) + (teacher.amax() - teacher.amin()))
    floor = max(1e-6, 4 * torch.finfo(torch.float32).eps * span / temperature)
    atol = tol * xr.grad.abs().max().item() + floor / n_valid
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=atol)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    vocab=st.integers(1, 33),
    beta=st.sampled_from(BETAS),
    temperature=st.sampled_from(TEMPERATURES),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    chunk_tokens=st.one_of(st.none(), st.integers(1, 7)),
    use_mask=st.booleans(),
    scale=st.sampled_from([0.1, 3.0, 12.0]),
)
def test_matches_float64_reference(seed, lead, vocab, beta, temperature, dtype, chunk_tokens,
                                   use_mask, scale):
    student, teacher, mask = _inputs(seed, lead, vocab, dtype, scale)
    _check_against_reference(student, teacher, mask if use_mask else None, beta, temperature,
                             chunk_tokens)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_every_beta_and_temperature_with_mask(beta, temperature):
    student, teacher, mask = _inputs(7, (6, 3), 50, torch.float32)
    _check_against_reference(student, teacher, mask, beta, temperature, chunk_tokens=4)


def test_continuous_option_matches_reference_and_is_continuous_at_endpoints():
    student, teacher, mask = _inputs(11, (4, 5), 40, torch.float32)
    for beta in (0.1, 0.5, 0.9):
        _check_against_reference(student, teacher, mask, beta, 1.0, continuous=True)

    # The limit itself, in float64 (float32 loses ~1e-7/β relative precision very near the ends).
    student, teacher, mask = _inputs(11, (4, 5), 40, torch.float64, scale=1.0)

    def value(beta, continuous=True):
        return generalized_jsd(student, teacher, beta=beta, mask=mask,
                               continuous=continuous).item()

    for endpoint, towards in ((0.0, lambda eps: eps), (1.0, lambda eps: 1.0 - eps)):
        limit = value(endpoint)
        gaps = [abs(value(towards(eps)) - limit) for eps in (1e-2, 1e-3, 1e-4, 1e-5)]
        pairs = zip(gaps[:-1], gaps[1:], strict=True)
        assert all(later < 0.2 * earlier for earlier, later in pairs), gaps
        assert gaps[-1] < 1e-4 * limit
        # Unscaled (TRL) interior tends to 0 instead: the documented discontinuity.
        assert value(towards(1e-5), continuous=False) < 2e-5 * limit


@pytest.mark.parametrize("beta", BETAS)
def test_equal_inputs_give_zero_loss_and_gradient(beta):
    logits, _, mask = _inputs(3, (5, 4), 64, torch.float32, scale=5.0)
    x = logits.clone().requires_grad_()
    loss = generalized_jsd(x, logits, beta=beta, temperature=1.5, mask=mask)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert x.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("beta", BETAS)
def test_all_masked_and_empty_give_zero_without_nan(beta):
    student, teacher, _ = _inputs(4, (3, 4), 16, torch.bfloat16)
    for s, t, mask in ((student, teacher, torch.zeros(3, 4, dtype=torch.bool)),
                       (student[:0], teacher[:0], None)):
        x = s.clone().requires_grad_()
        loss = generalized_jsd(x, t, beta=beta, mask=mask)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.all(x.grad == 0)


def test_temperature_divides_both_logits_without_t_squared():
    student, teacher, mask = _inputs(5, (4, 3), 30, torch.float32)
    for beta in (0.0, 0.5, 1.0):
        at_t = generalized_jsd(student, teacher, beta=beta, temperature=2.5, mask=mask)
        scaled = generalized_jsd(student / 2.5, teacher / 2.5, beta=beta, mask=mask)
        torch.testing.assert_close(at_t, scaled, rtol=1e-6, atol=1e-7)
    # A very high temperature flattens both distributions towards uniform: divergence -> 0.
    assert generalized_jsd(student, teacher, beta=0.0, temperature=1e4).item() < 1e-6


def test_mask_drops_exactly_the_masked_tokens():
    student, teacher, mask = _inputs(6, (5, 4), 20, torch.float32)
    full = per_token_generalized_jsd(student, teacher, beta=0.5)
    masked = per_token_generalized_jsd(student, teacher, beta=0.5, mask=mask)
    torch.testing.assert_close(masked, torch.where(mask, full, 0.0))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.5, mask=mask),
                               full[mask].mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(dtype):
    student, teacher, mask = _inputs(8, (7, 3), 45, dtype)
    results = []
    for chunk_tokens in (1, 2, 5, 21, 1000):
        x = student.clone().requires_grad_()
        loss = generalized_jsd(x, teacher, beta=0.3, temperature=2.0, mask=mask,
                               chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), x.grad.float()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-2 if dtype == torch.bfloat16
                                   else 1e-5, atol=1e-6)


def test_one_hot_teacher_is_cross_entropy():
    torch.manual_seed(9)
    student = torch.randn(6, 2, 25)
    target = torch.randint(0, 25, (6, 2))
    teacher = torch.full((6, 2, 25), float("-inf"))
    teacher.scatter_(-1, target.unsqueeze(-1), 0.0)
    x = student.clone().requires_grad_()
    loss = generalized_jsd(x, teacher, beta=0.0)
    loss.backward()
    x2 = student.clone().requires_grad_()
    ce = F.cross_entropy(x2.reshape(-1, 25), target.reshape(-1))
    ce.backward()
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("beta", BETAS)
def test_float64_inputs_match_reference_to_float64_precision(beta):
    # (torch.autograd.gradcheck needs backward twice per forward, which this loss refuses.)
    student, teacher, mask = _inputs(10, (3, 2), 7, torch.float64)
    x = student.clone().requires_grad_()
    loss = generalized_jsd(x, teacher, beta=beta, temperature=1.3, mask=mask, chunk_tokens=2)
    loss.backward()
    xr = student.clone().requires_grad_()
    ref = ref_masked_mean(ref_divergence(xr, teacher, beta, 1.3), mask)
    ref.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-14)


def test_upstream_gradient_and_per_token_output():
    student, teacher, _ = _inputs(12, (4, 3), 18, torch.float32)
    weights = torch.rand(4, 3)
    x = student.clone().requires_grad_()
    (per_token_generalized_jsd(x, teacher, beta=0.9, chunk_tokens=3) * weights).sum().backward()
    xr = student.double().requires_grad_()
    (ref_divergence(xr, teacher, 0.9) * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)


def test_no_gradient_buffer_without_grad_and_teacher_gets_none():
    student, teacher, _ = _inputs(13, (3,), 10, torch.float32)
    t = teacher.clone().requires_grad_()
    x = student.clone().requires_grad_()
    generalized_jsd(x, t, beta=0.5).backward()
    assert t.grad is None and x.grad is not None
    # Evaluation (no_grad) with a student that requires grad: no gradient buffer is built.
    with torch.no_grad(), _LargestAllocations() as seen:
        assert math.isfinite(generalized_jsd(x, teacher, beta=0.5, chunk_tokens=1).item())
    assert max(seen.largest.values()) <= student.shape[-1]


def test_backward_twice_raises():
    student, teacher, _ = _inputs(14, (3,), 10, torch.float32)
    x = student.clone().requires_grad_()
    loss = generalized_jsd(x, teacher, beta=0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


class _LargestAllocations(TorchDispatchMode):
    """Records, per dtype, the element count of the largest *new* tensor any op produced
    (views and in-place results share an input's storage and are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [*args, *(kwargs or {}).values()]
        inputs = {a.untyped_storage().data_ptr() for a in flat_in if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_no_float32_tensor_larger_than_one_chunk(beta):
    """Memory contract: fp32 temporaries are one chunk; the only full-size buffer is the
    gradient in the input dtype."""
    tokens, vocab, chunk = 24, 96, 3
    student, teacher, mask = _inputs(15, (tokens,), vocab, torch.bfloat16)
    x = student.clone().requires_grad_()
    with _LargestAllocations() as seen:
        generalized_jsd(x, teacher, beta=beta, mask=mask, chunk_tokens=chunk).backward()
    assert seen.largest[torch.float32] <= chunk * vocab
    assert seen.largest[torch.bfloat16] == tokens * vocab  # the gradient itself


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=-0.1), "beta must be"),
        (dict(beta=1.5), "beta must be"),
        (dict(beta=float("nan")), "beta must be"),
        (dict(beta=0.5, temperature=0.0), "temperature must be"),
        (dict(beta=0.5, temperature=-1.0), "temperature must be"),
        (dict(beta=0.5, chunk_tokens=0), "chunk_tokens"),
        (dict(beta=0.5, mask=torch.ones(4, dtype=torch.bool)), "mask shape"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    student, teacher, _ = _inputs(16, (3, 2), 10, torch.float32)
    with pytest.raises(ValueError, match=match):
        generalized_jsd(student, teacher, **kwargs)


def test_bad_shapes_raise():
    student = torch.randn(3, 2, 10)
    with pytest.raises(ValueError, match="leading shape"):
        generalized_jsd(student, torch.randn(2, 3, 10), beta=0.5)
    with pytest.raises(ValueError, match="vocabulary shard mismatch"):
        generalized_jsd(student, torch.randn(3, 2, 11), beta=0.5)
    with pytest.raises(ValueError, match="0-d"):
        generalized_jsd(torch.tensor(1.0), torch.tensor(1.0), beta=0.5)
    with pytest.raises(ValueError, match="floating point"):
        generalized_jsd(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4), beta=0.5)
