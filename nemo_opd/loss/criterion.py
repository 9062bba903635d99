"""The generalized JSD as a ModelOpt distillation criterion (``modelopt.torch.distill``).

This is how NeMo 2.x / Megatron-Bridge / Megatron-LM distillation configs use a logits loss:
ModelOpt's ``DistillationModel`` captures the student's and the teacher's ``output_layer``
outputs and calls ``criterion(student_output, teacher_output)``; Megatron's loss function then
masks and averages the per-token result (``_mask_loss``) and ModelOpt's
``LogitsAndIntermediatesLossBalancer`` combines it with other losses. For example::

    from modelopt.torch.distill.plugins.megatron import (
        DistillationConfig, LogitsAndIntermediatesLossBalancer)
    from megatron.core import parallel_state

    criterion = GeneralizedJSDLogitsLoss(
        beta=0.5, temperature=1.0, tp_group=parallel_state.get_tensor_model_parallel_group())
    cfg = DistillationConfig(
        criterion={("output_layer", "output_layer"): criterion},
        loss_balancer=LogitsAndIntermediatesLossBalancer(skip_original_loss=True))

The class name contains ``Logits`` on purpose: ModelOpt's balancer finds the logits loss by
looking for that word in the criterion's class name.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.modules.loss import _Loss

from nemo_opd.loss.jsd import per_token_generalized_jsd
from nemo_opd.loss.topk import per_token_topk_generalized_jsd, teacher_topk
from nemo_opd.loss.vocab_parallel import check_beta, check_temperature

__all__ = ["GeneralizedJSDLogitsLoss"]


class GeneralizedJSDLogitsLoss(_Loss):
    """ModelOpt criterion computing :func:`~nemo_opd.loss.generalized_jsd` per token.

    Same divergence (β = 0 forward ``KL(T‖S)``, β = 1 reverse ``KL(S‖T)``, interior TRL JSD,
    ``continuous`` option, no T² factor), vocab-parallel over ``tp_group``, token-chunked.
    With ``top_k`` set, the teacher is reduced to its global top-k plus a tail bucket first
    (:func:`~nemo_opd.loss.topk_generalized_jsd`).

    ``forward(predictions, targets)`` takes the student's and teacher's output-layer outputs,
    ``[s, b, V/tp]`` logits or megatron's ``(logits, bias)`` tuples, and returns megatron's
    distillation triple ``(loss [b, s], tp_reduce=False, is_sequence_parallel=False)``: the
    per-token divergence (float32) transposed to ``[b, s]`` for the loss mask, already complete
    on every TP rank (unlike ModelOpt's ``LogitsKLLoss``, whose per-rank partial sums need
    ``tp_reduce=True``). Reduce it with the loss mask (Megatron-LM's ``_mask_loss``).
    """

    def __init__(
        self,
        beta: float,
        *,
        temperature: float = 1.0,
        continuous: bool = False,
        top_k: int | None = None,
        tp_group: dist.ProcessGroup | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_beta(beta)
        check_temperature(temperature)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        self.beta, self.temperature, self.continuous = float(beta), float(temperature), continuous
        self.top_k, self.tp_group, self.chunk_tokens = top_k, tp_group, chunk_tokens

    def forward(self, predictions: torch.Tensor | tuple, targets: torch.Tensor | tuple
                ) -> tuple[torch.Tensor, bool, bool]:
        student = predictions[0] if isinstance(predictions, tuple) else predictions
        teacher = (targets[0] if isinstance(targets, tuple) else targets).detach()
        if student.dim() != 3:
            raise ValueError("expected megatron logits [s, b, V/tp], got shape "
                             f"{tuple(student.shape)}")
        kwargs = dict(beta=self.beta, temperature=self.temperature, tp_group=self.tp_group,
                      chunk_tokens=self.chunk_tokens, continuous=self.continuous)
        if self.top_k is None:
            per_token = per_token_generalized_jsd(student, teacher, **kwargs)
        else:
            top = teacher_topk(teacher, self.top_k, temperature=self.temperature,
                               tp_group=self.tp_group, chunk_tokens=self.chunk_tokens)
            per_token = per_token_topk_generalized_jsd(student, top, **kwargs)
        return per_token.transpose(0, 1).contiguous(), False, False
