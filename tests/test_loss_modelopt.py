"""The losses next to NVIDIA ModelOpt at TP=1: β=0 against ``LogitsKLLoss``, and
``GeneralizedJSDLogitsLoss`` as a ``modelopt.torch.distill`` criterion. (TP=2 versions,
including megatron-core's ``vocab_parallel_cross_entropy``, are in test_loss_tp2.py.)"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from test_loss_reference import ref_divergence, ref_masked_mean, ref_topk_divergence

from nemo_opd.loss import GeneralizedJSDLogitsLoss, generalized_jsd, teacher_topk

mtd = pytest.importorskip("modelopt.torch.distill")
megatron_plugin = pytest.importorskip("modelopt.torch.distill.plugins.megatron")


def _megatron_mask_loss(output, loss_mask):
    """Megatron-LM's ``_mask_loss`` for distillation outputs (post_training/loss_func.py)."""
    losses, tp_reduce, _ = output
    assert not tp_reduce  # our per-token values are already complete on every TP rank
    mask = loss_mask.reshape(-1).float()
    return torch.sum(losses.reshape(-1).float() * mask) / mask.sum()


def _logits(seed, s=6, b=3, v=29, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(s, b, v, generator=gen) * 2).to(dtype) for _ in range(2))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beta_zero_equals_modelopt_logits_kl_loss(temperature, dtype):
    student, teacher = _logits(0, dtype=dtype)
    config = types.SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)
    theirs = megatron_plugin.LogitsKLLoss(config, temperature=temperature)
    x1, x2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    per_token, tp_reduce, _ = theirs(x1, teacher)  # [b, s]
    their_loss = per_token.mean()
    their_loss.backward()
    ours = generalized_jsd(x2, teacher, beta=0.0, temperature=temperature)
    ours.backward()
    torch.testing.assert_close(ours, their_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad.float(), x1.grad.float(),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    # ModelOpt's reverse=True is KL(S‖T): our β = 1.
    reverse = megatron_plugin.LogitsKLLoss(config, temperature=temperature, reverse=True)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0, temperature=temperature),
                               reverse(student, teacher)[0].mean(), rtol=1e-5, atol=1e-6)


class _TinyLM(torch.nn.Module):
    def __init__(self, seed: int, vocab: int = 23):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Linear(8, 8)
        self.output_layer = torch.nn.Linear(8, vocab, bias=False)

    def forward(self, x):  # [s, b, 8] -> [s, b, vocab], megatron's layout
        return self.output_layer(torch.tanh(self.body(x)))


@pytest.mark.parametrize("top_k", [None, 5])
def test_criterion_inside_modelopt_distillation_model(top_k):
    student, teacher = _TinyLM(0), _TinyLM(1)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)  # no capture hooks
    criterion = GeneralizedJSDLogitsLoss(beta=0.5, temperature=2.0, top_k=top_k)
    assert "Logits" in type(criterion).__name__  # how ModelOpt's balancer finds it
    model = mtd.convert(student, mode=[("kd_loss", {
        "teacher_model": teacher,
        "criterion": {("output_layer", "output_layer"): criterion},
        "loss_balancer": megatron_plugin.LogitsAndIntermediatesLossBalancer(
            skip_original_loss=True),
    })])
    x = torch.randn(7, 2, 8)
    loss_mask = torch.rand(2, 7) < 0.7  # [b, s], megatron's loss-mask layout
    model(x)
    losses = model.compute_kd_loss(
        student_loss=torch.tensor(0.0),
        loss_reduction_fn=lambda out: _megatron_mask_loss(out, loss_mask))
    losses["kd_loss"].backward()

    with torch.no_grad():
        s_logits, t_logits = ref_student(x).double(), ref_teacher(x).double()
    mask_sb = loss_mask.t()
    if top_k is None:
        per_token = ref_divergence(s_logits, t_logits, 0.5, 2.0)
    else:
        indices = teacher_topk(t_logits.float(), top_k).indices
        per_token = ref_topk_divergence(s_logits, t_logits, indices, 0.5, 2.0)
    torch.testing.assert_close(losses["kd_loss"].double(), ref_masked_mean(per_token, mask_sb),
                               rtol=1e-5, atol=1e-6)
    assert student.output_layer.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_criterion_output_format_and_bad_config():
    student, teacher = _logits(3)
    loss, tp_reduce, sequence_parallel = GeneralizedJSDLogitsLoss(beta=1.0)(
        (student, None), (teacher, None))  # ColumnParallelLinear returns (logits, bias)
    assert loss.shape == (3, 6) and not tp_reduce and not sequence_parallel
    torch.testing.assert_close(loss.double(), ref_divergence(student, teacher, 1.0).t(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        GeneralizedJSDLogitsLoss(beta=1.2)
    with pytest.raises(ValueError, match="top_k"):
        GeneralizedJSDLogitsLoss(beta=0.5, top_k=0)
    with pytest.raises(ValueError, match=r"\[s, b, V/tp\]"):
        GeneralizedJSDLogitsLoss(beta=0.5)(student[0], teacher[0])
