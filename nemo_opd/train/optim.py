"""The student's optimizer, learning-rate schedule, gradient reduction and clipping.

The choice of optimizer lives here and only here. megatron-core's ``DistributedOptimizer`` and
``FP32Optimizer`` cannot be built without CUDA (hard-coded ``device="cuda"``), so the trainer uses
plain ``torch.optim.AdamW`` over this rank's parameter shards, with

* gradients averaged over the data-parallel group by :func:`reduce_gradients` (and the q/k-norm
  gradients megatron leaves partial over TP summed:
  :func:`nemo_opd.models.reduce_tp_partial_grads`);
* the global gradient norm counting each tensor-parallel shard once and each replicated
  parameter once (:func:`global_grad_norm`), as megatron's ``get_grad_norm_fp32`` does;
* checkpoints through megatron's ``optim_state_to_sharding_state`` (:func:`optimizer_sharded_state`)
  so optimizer state is resharded with the model's parameters.

On GPU the distributed optimizer would replace this module (not wired yet).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from nemo_opd.config import OptimConfig
from nemo_opd.models import reduce_tp_partial_grads

__all__ = [
    "build_optimizer",
    "learning_rate",
    "set_learning_rate",
    "reduce_gradients",
    "global_grad_norm",
    "clip_gradients",
    "init_optimizer_state",
    "optimizer_sharded_state",
    "data_parallel_group",
]


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not."""
    params = _trainable(model)
    if not params:
        raise ValueError("the student has no trainable parameter")
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` (``lr · (step + 1) / warmup``), then cosine from
    ``lr`` to ``min_lr`` at ``total_steps − 1``. ``step`` is the 0-based optimizer step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def reduce_gradients(model: torch.nn.Module, *, tp_group: dist.ProcessGroup | None,
                     dp_group: dist.ProcessGroup | None) -> None:
    """Finish gradients after backward: sum TP-partial ones, average over data parallel."""
    reduce_tp_partial_grads(model, tp_group)
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return
    scale = 1.0 / dist.get_world_size(dp_group)
    for _, param in _trainable(model):
        if param.grad is not None:
            grad = param.grad.contiguous()  # gloo mis-sends non-contiguous tensors
            dist.all_reduce(grad, group=dp_group)
            param.grad = grad.mul_(scale)


def global_grad_norm(model: torch.nn.Module, *, tp_group: dist.ProcessGroup | None) -> float:
    """L2 norm of the whole model's gradient: TP shards summed, replicated params once."""
    total = torch.zeros((), dtype=torch.float64)
    for _, param in _trainable(model):
        if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
            total += param.grad.detach().double().pow(2).sum().cpu()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(total, group=tp_group)
    return float(total.sqrt())


def clip_gradients(model: torch.nn.Module, max_norm: float, norm: float) -> None:
    """Scale gradients by ``max_norm / norm`` when ``norm`` exceeds it (0 = off)."""
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return
    factor = max_norm / (norm + 1e-6)
    for _, param in _trainable(model):
        if param.grad is not None:
            param.grad.mul_(factor)


def init_optimizer_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's (zero) moment buffers, so a checkpoint can be loaded into them."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not optimizer.state[param]:
                optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def optimizer_sharded_state(model: torch.nn.Module, optimizer: torch.optim.AdamW) -> dict:
    """The optimizer state dict with each moment buffer as a megatron ``ShardedTensor`` sharded
    like its parameter. AdamW's per-parameter ``step`` counts are left out (they are not shaped
    like parameters); loading puts them back from the checkpoint's step counter."""
    init_optimizer_state(optimizer)
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    id_map = get_param_id_to_sharded_param_map(model.sharded_state_dict(), params)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return state


def data_parallel_group() -> dist.ProcessGroup | None:
    """The student's data-parallel group (None in a world of one)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group()
