"""Every loss at TP=2 on gloo against the float64 full-vocabulary reference, ModelOpt's
``LogitsKLLoss`` and megatron-core's ``vocab_parallel_cross_entropy``.

Process start costs ~4 s per rank, so each test is one spawned run that loops over all of its
cases and asserts inside the ranks (a failing rank's traceback names the case).
"""

from __future__ import annotations

import pytest
from multirank import run_ranks

pytestmark = pytest.mark.multirank

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _full(seed, shape, scale=2.0, dtype=None):
    """The same full tensor on every rank (each rank then takes its shard)."""
    import torch

    out = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return out if dtype is None else out.to(dtype)


def _bounds(rank, sizes):
    """This rank's ``[lo, hi)`` vocabulary slice for shard ``sizes``."""
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _close_grads(grad, ref, n_valid, tol):
    import torch

    atol = tol * ref.abs().max().item() + 1e-6 / max(n_valid, 1)
    torch.testing.assert_close(grad.double(), ref, rtol=0, atol=atol)


def _same_on_all_ranks(value, group):
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, value.contiguous(), group=group)
    assert all(torch.equal(parts[0], p) for p in parts), [p.item() for p in parts]


def _math_checks() -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from test_loss_reference import (
        ref_divergence,
        ref_log_softmax,
        ref_masked_mean,
        ref_sampled_loss,
        ref_topk,
        ref_topk_divergence,
    )

    from nemo_opd.loss import (
        fused_generalized_jsd,
        generalized_jsd,
        sampled_token_reverse_kl,
        teacher_topk,
        topk_generalized_jsd,
        vocab_parallel_logprobs,
    )
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    checks = 0
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        group = parallel_state.get_tensor_model_parallel_group()
        rank = dist.get_rank(group)

        # --- generalized JSD: β × T × dtype × chunking, even and uneven vocabulary shards.
        for vocab, sizes in ((38, (19, 19)), (37, (18, 19))):
            lo, hi = _bounds(rank, sizes)
            mask = _full(1, (5, 3)) > -0.5
            for dtype in (torch.float32, torch.bfloat16):
                student = _full(2, (5, 3, vocab), dtype=dtype)
                teacher = _full(3, (5, 3, vocab), dtype=dtype)
                for beta in BETAS:
                    for temperature in (1.0, 2.0):
                        for chunk_tokens in (None, 4):
                            x = student[..., lo:hi].clone().requires_grad_()
                            loss = generalized_jsd(x, teacher[..., lo:hi], beta=beta,
                                                   temperature=temperature, mask=mask,
                                                   tp_group=group, chunk_tokens=chunk_tokens)
                            loss.backward()
                            xr = student.double().requires_grad_()
                            ref = ref_masked_mean(ref_divergence(xr, teacher, beta, temperature),
                                                  mask)
                            ref.backward()
                            torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5,
                                                       atol=2e-6)
                            _close_grads(x.grad, xr.grad[..., lo:hi], int(mask.sum()),
                                         2e-2 if dtype == torch.bfloat16 else 2e-5)
                            _same_on_all_ranks(loss.detach(), group)
                            checks += 1
        # TP=2 equals TP=1 (continuous option too), and an all-masked batch is 0 on both ranks.
        student, teacher = _full(4, (6, 2, 40)), _full(5, (6, 2, 40))
        lo, hi = _bounds(rank, (20, 20))
        for beta in (0.0, 0.3, 1.0):
            tp2 = generalized_jsd(student[..., lo:hi], teacher[..., lo:hi], beta=beta,
                                  tp_group=group, continuous=True)
            tp1 = generalized_jsd(student, teacher, beta=beta, continuous=True)
            torch.testing.assert_close(tp2, tp1, rtol=1e-6, atol=1e-7)
        empty = generalized_jsd(student[..., lo:hi], teacher[..., lo:hi], beta=0.5,
                                tp_group=group, mask=torch.zeros(6, 2, dtype=torch.bool))
        assert empty.item() == 0.0
        checks += 4

        # --- top-k teacher (k larger than one shard) and its loss.
        vocab, sizes = 37, (18, 19)
        lo, hi = _bounds(rank, sizes)
        student, teacher = _full(6, (4, 3, vocab)), _full(7, (4, 3, vocab))
        mask = _full(8, (4, 3)) > -0.5
        for k in (1, 5, 25, 37):
            top = teacher_topk(teacher[..., lo:hi], k, temperature=2.0, tp_group=group,
                               chunk_tokens=5)
            indices, logp, log_tail = ref_topk(teacher, k, temperature=2.0)
            torch.testing.assert_close(top.indices, indices)
            torch.testing.assert_close(top.logprobs.double(), logp, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(top.log_tail.double(), log_tail, rtol=1e-6, atol=1e-6)
            for beta in BETAS:
                x = student[..., lo:hi].clone().requires_grad_()
                loss = topk_generalized_jsd(x, top, beta=beta, temperature=2.0, mask=mask,
                                            tp_group=group)
                loss.backward()
                if k == vocab:  # empty tail: equal to the full divergence
                    ref = ref_masked_mean(ref_divergence(student, teacher, beta, 2.0), mask)
                    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-6)
                    continue
                xr = student.double().requires_grad_()
                ref = ref_masked_mean(ref_topk_divergence(xr, teacher, indices, beta, 2.0), mask)
                ref.backward()
                torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
                _close_grads(x.grad, xr.grad[..., lo:hi], int(mask.sum()), 2e-5)
                checks += 1

        # --- log-probs at ids and the sampled-token reverse KL.
        tokens = torch.randint(0, vocab, (4, 3), generator=torch.Generator().manual_seed(9))
        x = student[..., lo:hi].clone().requires_grad_()
        logp = vocab_parallel_logprobs(x, tokens, temperature=0.7, tp_group=group)
        logp.sum().backward()
        xr = student.double().requires_grad_()
        ref = ref_log_softmax(xr, 0.7).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        ref.sum().backward()
        torch.testing.assert_close(logp.double(), ref.detach(), rtol=1e-6, atol=1e-6)
        _close_grads(x.grad, xr.grad[..., lo:hi], 1, 2e-5)
        teacher_logp = ref_log_softmax(teacher, 0.7).gather(-1, tokens.unsqueeze(-1))[..., 0]
        rollout = ref.detach() + 0.2 * _full(10, (4, 3), dtype=torch.float64)
        for clip in (None, 0.2):
            x = student[..., lo:hi].clone().requires_grad_()
            out = sampled_token_reverse_kl(x, tokens, teacher_logp.float(), rollout.float(),
                                           temperature=0.7, clip_ratio=clip, mask=mask,
                                           tp_group=group)
            out.loss.backward()
            xr = student.double().requires_grad_()
            ref = ref_masked_mean(ref_sampled_loss(xr, tokens, teacher_logp.float(),
                                                   rollout.float(), 0.7, clip), mask)
            ref.backward()
            torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            _close_grads(x.grad, xr.grad[..., lo:hi], int(mask.sum()), 2e-5)
            checks += 1

        # --- fused == unfused at TP=2; the hidden-state gradient is complete on every rank.
        vocab, hidden = 30, 6
        lo, hi = _bounds(rank, (15, 15))
        for dtype in (torch.float32, torch.bfloat16):
            h_s, h_t = _full(11, (5, 2, hidden), 1.0, dtype), _full(12, (5, 2, 4), 1.0, dtype)
            w_s, w_t = _full(13, (vocab, hidden), 0.5, dtype), _full(14, (vocab, 4), 0.5, dtype)
            mask = _full(15, (5, 2)) > -0.5
            for beta in (0.0, 0.5, 1.0):
                h, w = h_s.clone().requires_grad_(), w_s[lo:hi].clone().requires_grad_()
                fused = fused_generalized_jsd(h, w, h_t, w_t[lo:hi], beta=beta, temperature=2.0,
                                              mask=mask, tp_group=group, chunk_tokens=3)
                fused.backward()
                h2, w2 = h_s.clone().requires_grad_(), w_s[lo:hi].clone().requires_grad_()
                unfused = generalized_jsd(h2 @ w2.t(), h_t @ w_t[lo:hi].t(), beta=beta,
                                          temperature=2.0, mask=mask, tp_group=group)
                unfused.backward()
                partial = h2.grad.float().contiguous()
                dist.all_reduce(partial, group=group)  # the unfused grad is this rank's part
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(h.grad.float(), partial, rtol=0,
                                           atol=tol * partial.abs().max().item())
                torch.testing.assert_close(w.grad.float(), w2.grad.float(), rtol=0,
                                           atol=tol * w2.grad.float().abs().max().item())
                _same_on_all_ranks(h.grad.float(), group)
                checks += 1
    return checks


def _library_and_error_checks() -> int:
    import types

    import pytest
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss
    from test_loss_reference import ref_divergence, ref_masked_mean

    from nemo_opd.loss import GeneralizedJSDLogitsLoss, generalized_jsd
    from nemo_opd.runtime import ParallelConfig, distributed_runtime

    checks = 0
    with distributed_runtime(ParallelConfig(tensor_model_parallel_size=2)):
        group = parallel_state.get_tensor_model_parallel_group()
        rank = dist.get_rank(group)
        vocab = 32
        lo, hi = _bounds(rank, (16, 16))
        mask = _full(20, (6, 3)) > -0.5

        # --- β=0 against ModelOpt's LogitsKLLoss, after summing its per-rank partial sums.
        config = types.SimpleNamespace(tensor_model_parallel_size=2, sequence_parallel=False)
        for dtype in (torch.float32, torch.bfloat16):
            student, teacher = _full(21, (6, 3, vocab), dtype=dtype), _full(22, (6, 3, vocab),
                                                                           dtype=dtype)
            for temperature in (1.0, 2.0):
                partial, tp_reduce, _ = LogitsKLLoss(config, temperature=temperature)(
                    student[..., lo:hi], teacher[..., lo:hi])
                assert tp_reduce  # ModelOpt leaves the TP reduction to the caller
                per_token = partial.detach().contiguous()
                dist.all_reduce(per_token, group=group)
                theirs = ref_masked_mean(per_token.t().double(), mask)
                ours = generalized_jsd(student[..., lo:hi], teacher[..., lo:hi], beta=0.0,
                                       temperature=temperature, mask=mask, tp_group=group)
                torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
                checks += 1

        # --- one-hot teacher against megatron-core's vocab_parallel_cross_entropy (its target
        # often lives on the other rank, so a whole teacher shard is -inf).
        student = _full(23, (6, 3, vocab))
        target = torch.randint(0, vocab, (6, 3), generator=torch.Generator().manual_seed(24))
        teacher = torch.full((6, 3, vocab), float("-inf"))
        teacher.scatter_(-1, target.unsqueeze(-1), 0.0)
        x1 = student[..., lo:hi].clone().requires_grad_()
        ce = vocab_parallel_cross_entropy(x1.clone(), target)  # [s, b]
        (ce * mask).sum().div(mask.sum()).backward()
        x2 = student[..., lo:hi].clone().requires_grad_()
        ours = generalized_jsd(x2, teacher[..., lo:hi], beta=0.0, mask=mask, tp_group=group)
        ours.backward()
        torch.testing.assert_close(ours, (ce * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-7)
        checks += 1

        # --- the ModelOpt criterion at TP=2 (and its top-k form).
        student, teacher = _full(25, (6, 3, vocab)), _full(26, (6, 3, vocab))
        criterion = GeneralizedJSDLogitsLoss(beta=0.5, temperature=2.0, tp_group=group)
        loss, tp_reduce, _ = criterion((student[..., lo:hi], None), (teacher[..., lo:hi], None))
        assert not tp_reduce and loss.shape == (3, 6)
        torch.testing.assert_close(loss.double(), ref_divergence(student, teacher, 0.5, 2.0).t(),
                                   rtol=1e-5, atol=1e-6)
        top = GeneralizedJSDLogitsLoss(beta=0.5, temperature=2.0, top_k=vocab, tp_group=group)
        torch.testing.assert_close(top(student[..., lo:hi], teacher[..., lo:hi])[0], loss,
                                   rtol=1e-5, atol=1e-6)
        checks += 2

        # --- bad input on one rank only raises the same error on both (no hang).
        student, teacher = _full(27, (4, vocab)), _full(28, (4, vocab))
        bad_teacher = teacher[..., lo:hi - 1] if rank == 1 else teacher[..., lo:hi]
        with pytest.raises(ValueError, match=r"vocabulary shard mismatch.*tp rank\(s\) \[1\]"):
            generalized_jsd(student[..., lo:hi], bad_teacher, beta=0.5, tp_group=group)
        tokens = 4 if rank == 0 else 3
        with pytest.raises(ValueError, match="replicated across the TP group"):
            generalized_jsd(student[:tokens, lo:hi], teacher[:tokens, lo:hi], beta=0.5,
                            tp_group=group)
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(student[..., lo:hi], teacher[..., lo:hi], beta=1.5, tp_group=group)
        # ... and the group still works afterwards.
        assert generalized_jsd(student[..., lo:hi], teacher[..., lo:hi], beta=0.5,
                               tp_group=group).isfinite()
        checks += 4
    return checks


def test_losses_at_tp2_match_float64_reference():
    results = run_ranks(_math_checks, world_size=2, timeout=300)
    assert results[0] == results[1] > 0


def test_losses_at_tp2_match_modelopt_and_megatron():
    results = run_ranks(_library_and_error_checks, world_size=2, timeout=300)
    assert results[0] == results[1] > 0
