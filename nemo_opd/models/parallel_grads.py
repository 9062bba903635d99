"""Gradients that megatron-core leaves partial across tensor-parallel ranks.

With ``qk_layernorm`` (Qwen3) each TP rank applies the replicated ``q_layernorm``/``k_layernorm``
weights to its own heads only, so after backward each rank holds the gradient summed over *its*
heads. megatron-core 0.16 all-reduces such replicated-weight gradients only under sequence
parallelism (``finalize_model_grads``), so without it the copies would drift apart. The trainer
calls :func:`reduce_tp_partial_grads` after backward; the TP=1 == TP=2 test proves the sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["tp_partial_grad_params", "reduce_tp_partial_grads"]

_PARTIAL_MODULES = ("q_layernorm", "k_layernorm")


def tp_partial_grad_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Replicated parameters whose gradient each TP rank only knows in part."""
    return [param for name, param in model.named_parameters()
            if param.requires_grad and any(f".{m}." in f".{name}" for m in _PARTIAL_MODULES)]


def reduce_tp_partial_grads(model: torch.nn.Module, tp_group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of :func:`tp_partial_grad_params` over ``tp_group`` (no-op at TP=1)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    for param in tp_partial_grad_params(model):
        if param.grad is not None:
            grad = param.grad.contiguous()  # gloo mis-sends non-contiguous tensors
            dist.all_reduce(grad, group=tp_group)
            param.grad = grad
