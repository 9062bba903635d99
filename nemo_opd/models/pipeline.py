"""Forward (and backward) of a megatron ``GPTModel`` whatever its pipeline size.

At PP=1 a model is called directly. At PP>1 each rank holds one stage, and megatron-core's
pipeline schedules (``get_forward_backward_func``) move activations between stages: the first
stage embeds the tokens, the last computes logits and, when training, the loss. Both functions
below take the model's own process groups (``model.pg_collection``), so a teacher on another
layout than the student's runs through its own pipeline.

Shapes: ``tokens [B, T]`` (right-padded; causal attention keeps padding out of earlier
positions); logits ``[B, T, V/tp]`` on the last stage only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from nemo_opd.runtime.cpu_backend import cpu_device_scope

__all__ = ["pipeline_size", "last_stage_rank", "model_logits",
           "forward_logits", "forward_backward"]

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(logits [B, T, V/tp]) -> (scalar loss to backpropagate, metrics)``."""


def pipeline_size(model: torch.nn.Module) -> int:
    return model.pg_collection.pp.size()


def last_stage_rank(model: torch.nn.Module) -> int:
    """Global rank of the last stage in this rank's pipeline."""
    return dist.get_global_rank(model.pg_collection.pp, model.pg_collection.pp.size() - 1)


def model_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T, V/tp]`` logits of a whole (PP=1) ``GPTModel`` for ``tokens [B, T]``."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, attention_mask=None)


def _schedule(model: torch.nn.Module, tokens: torch.Tensor, loss_fn: LossFn | None, *,
              forward_only: bool) -> list:
    """One pipeline pass of ``tokens`` as one micro batch; returns megatron's forward data
    store (the last stage's logits or ``loss_fn`` metrics; empty elsewhere)."""
    groups = model.pg_collection

    def forward_step(data_iterator: Any, stage: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        positions = torch.arange(batch.shape[1], device=batch.device).expand_as(batch)
        # With loss_fn None the schedule keeps the last stage's output (the logits) as is.
        return stage(batch, positions, attention_mask=None), loss_fn

    schedule = get_forward_backward_func(pp_size=groups.pp.size(), vp_size=None)
    kwargs = {}
    if groups.pp.size() > 1:
        kwargs = {"p2p_communicator": P2PCommunicator(pp_group=groups.pp, config=model.config),
                  "pg_collection": groups}
    with cpu_device_scope():
        return schedule(forward_step_func=forward_step, data_iterator=iter([tokens]),
                        model=model, num_microbatches=1, seq_length=tokens.shape[1],
                        micro_batch_size=tokens.shape[0], forward_only=forward_only, **kwargs)


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits of ``tokens`` (no autograd graph kept at PP>1): ``[B, T, V/tp]`` on the last
    pipeline stage, None on the others. Every rank of the model's pipeline calls it."""
    if pipeline_size(model) == 1:
        return model_logits(model, tokens)
    with torch.no_grad():
        store = _schedule(model, tokens, None, forward_only=True)
    return store[0] if store else None


def forward_backward(model: torch.nn.Module, tokens: torch.Tensor, loss_fn: LossFn
                     ) -> dict[str, Any] | None:
    """Forward ``tokens``, compute ``loss_fn`` on the last stage, backpropagate through every
    stage. Returns the last stage's metrics, None on the others (collective over the model's
    pipeline)."""
    if pipeline_size(model) == 1:
        loss, metrics = loss_fn(model_logits(model, tokens))
        loss.backward()
        return metrics
    store = _schedule(model, tokens, loss_fn, forward_only=False)
    return store[0] if store else None
