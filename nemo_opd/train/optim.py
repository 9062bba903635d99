"""The student's optimizer: mixed precision the megatron-core way, chosen here and only here.

On every device:

* megatron-core's ``DistributedDataParallel`` wraps the student. Backward accumulates each
  gradient into an fp32 ``main_grad`` buffer (``grad_reduce_in_fp32``), reduced over the
  data-parallel group in fp32 buckets (overlapped with backward on GPU);
  ``finalize_model_grads`` then finishes what megatron leaves open (the DP reduction, the q/k-norm
  gradients each TP rank holds in part, the tied embedding's gradient between first and last
  pipeline stage).
* megatron-core's ``OptimizerParamScheduler`` sets the learning rate (linear warmup to ``lr``,
  cosine to ``min_lr`` at the last step) and weight decay (matrices only).

With CUDA the optimizer is megatron-core's own, ``get_megatron_optimizer`` with
``OptimizerConfig(bf16=..., fp16=..., use_distributed_optimizer=...)``: fp32 master weights and
fp32 Adam moments (sharded over data parallel with the distributed optimizer), its gradient
clipping and loss scaling, and its sharded optimizer checkpoints.

Without CUDA megatron's optimizers cannot be built: ``Float16OptimizerWithFloat16Params`` accepts
only ``torch.cuda.*Tensor`` parameters, its loss-scale and overflow tensors are created with
``device="cuda"``, and its norm and clipping go through apex multi-tensor CUDA kernels.
:class:`CpuMixedPrecisionAdam` keeps their semantics with the same method names
(``prepare_grads`` → ``get_grad_norm``/``clip_grad_norm`` → ``step_with_ready_grads``): an fp32
copy of every bf16/fp16 parameter is what AdamW updates (fp32 moments), gradients arrive from the
fp32 ``main_grad`` buffers, the norm counts each tensor-parallel shard once and is summed over the
model-parallel group in float64, fp16 gets dynamic loss scaling, and the updated fp32 master is
rounded back into the model's parameters after each step. Checkpoints hold the fp32 masters
(``fp32_from_fp16_params``, as megatron's do), so a resume continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from nemo_opd.config import OptimConfig

__all__ = ["CpuMixedPrecisionAdam", "StudentOptimizer", "build_optimizer", "lr_scheduler",
           "data_parallel_group"]

logger = logging.getLogger(__name__)


def lr_scheduler(optimizer: Any, cfg: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    """megatron's scheduler over ``optimizer.param_groups``: linear warmup from 0 over
    ``warmup_steps``, then cosine from ``lr`` to ``min_lr``; constant weight decay scaled by
    each group's ``wd_mult``. Optimizer step ``k`` (0-based) runs at the scheduler's value after
    ``k + 1`` increments: ``lr·(k+1)/warmup`` while warming up, then
    ``min_lr + ½(lr − min_lr)(1 + cos(π·(k+1−warmup)/(total−warmup)))`` — ``min_lr`` at the
    last step, and no step at learning rate 0."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=total_steps, lr_decay_style="cosine",
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=total_steps,
        wd_incr_style="constant")


class _DynamicLossScale:
    """fp16 loss scaling with megatron's ``DynamicGradScaler`` rules (growth ×2, backoff ×½,
    ``hysteresis`` overflows before backing off, ``window`` clean steps before growing)."""

    def __init__(self, cfg: OptimConfig) -> None:
        self.scale = cfg.initial_loss_scale
        self.min_scale, self.window, self.hysteresis = (cfg.min_loss_scale,
                                                        cfg.loss_scale_window, cfg.hysteresis)
        self.growth_tracker, self.hysteresis_tracker = 0, cfg.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.window:
            self.growth_tracker, self.hysteresis_tracker = 0, self.hysteresis
            self.scale *= 2.0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


class CpuMixedPrecisionAdam:
    """AdamW on fp32 master weights for a megatron-DDP-wrapped model without CUDA.

    Parameter groups follow megatron's rule: matrices decay (``wd_mult=1``), vectors (norms,
    biases) do not. A bf16/fp16 parameter ``p`` gets an fp32 master ``p.main_param``; its
    gradient is ``p.main_grad`` (fp32, from DDP). fp32 parameters are their own masters.
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, *,
                 grad_stats_group: dist.ProcessGroup | None) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameter")
        # megatron's groups: matrices decay, vectors do not; empty groups are left out.
        self.model_params = [group for group in ([p for p in params if p.dim() >= 2],
                                                 [p for p in params if p.dim() < 2]) if group]
        masters = [[self._master(p) for p in group] for group in self.model_params]
        self.pairs = list(zip(chain.from_iterable(self.model_params),
                              chain.from_iterable(masters), strict=True))
        """(model parameter, its fp32 master) in optimizer order; a master is the parameter
        itself for fp32 parameters."""
        groups = [{"params": group_masters, "wd_mult": 1.0 if group[0].dim() >= 2 else 0.0,
                   "lr_mult": 1.0, "weight_decay": cfg.weight_decay}
                  for group, group_masters in zip(self.model_params, masters, strict=True)]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1,
                                                                     cfg.adam_beta2),
                                           eps=cfg.adam_eps, foreach=False)
        fp16 = any(p.dtype == torch.float16 for p in params)
        self.loss_scaler = (_DynamicLossScale(cfg) if fp16 and cfg.loss_scale == 0 else None)
        self.fixed_loss_scale = cfg.loss_scale if fp16 and cfg.loss_scale > 0 else 1.0
        self.grad_stats_group = grad_stats_group

    @staticmethod
    def _master(param: torch.nn.Parameter) -> torch.Tensor:
        if param.dtype == torch.float32:
            return param
        master = param.detach().clone().float()
        # The norm filters read these (megatron copies them the same way).
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "shared"):
            if hasattr(param, attr):
                setattr(master, attr, getattr(param, attr))
        param.main_param = master
        return master

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def get_loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else self.fixed_loss_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param, master in self.pairs:
            param.grad = None
            master.grad = None

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Point each master's ``.grad`` at its fp32 gradient and unscale it (fp16); returns
        whether a gradient is non-finite on any rank (then fp16 skips the step)."""
        inverse = 1.0 / self.get_loss_scale()
        for param, master in self.pairs:
            grad = param.main_grad if hasattr(param, "main_grad") else param.grad
            master.grad = None if grad is None else grad.float()
            if master.grad is not None and inverse != 1.0:
                master.grad.mul_(inverse)
        if self.loss_scaler is None and self.fixed_loss_scale == 1.0:
            return False  # bf16 / fp32: megatron checks for inf only with a loss scale
        found = torch.tensor([0.0 if all(torch.isfinite(m.grad).all() for _, m in self.pairs
                                          if m.grad is not None) else 1.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        found_inf = bool(found.item())
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_inf)
        return found_inf

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        """L2 norm of all master gradients: TP shards counted once, shared copies once, summed
        over the model-parallel group (TP × PP) in float64."""
        total = torch.zeros((), dtype=torch.float64)
        for _, master in self.pairs:
            if (master.grad is not None and param_is_not_shared(master)
                    and param_is_not_tensor_parallel_duplicate(master)):
                total += master.grad.double().pow(2).sum()
        group = self.grad_stats_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        return float(total.sqrt())

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        """Scale master gradients by ``clip / (norm + 1e-6)`` when that is < 1; return the norm
        before clipping."""
        norm = self.get_grad_norm()
        factor = clip_grad / (norm + 1e-6)
        if math.isfinite(norm) and factor < 1.0:
            for _, master in self.pairs:
                if master.grad is not None:
                    master.grad.mul_(factor)
        return norm

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """AdamW on the fp32 masters, then round them into the model's parameters."""
        self.optimizer.step()
        for param, master in self.pairs:
            if param is not master:
                param.data.copy_(master)
        return True

    def _init_state(self) -> None:
        for group in self.optimizer.param_groups:
            for master in group["params"]:
                if not self.optimizer.state[master]:
                    self.optimizer.state[master] = {
                        "step": torch.zeros((), dtype=torch.float32),
                        "exp_avg": torch.zeros_like(master),
                        "exp_avg_sq": torch.zeros_like(master)}

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False
                           ) -> dict[str, Any]:
        """Moments and fp32 masters as megatron ``ShardedTensor``\\ s sharded like their
        parameters (megatron's ``Float16OptimizerWithFloat16Params`` layout); per-parameter
        step counts are one ``common_step``."""
        self._init_state()
        state = {"optimizer": self.optimizer.state_dict()}
        id_map = get_param_id_to_sharded_param_map(
            model_sharded_state_dict, chain.from_iterable(self.model_params))
        step = next(iter(state["optimizer"]["state"].values()))["step"]
        optim_state_to_sharding_state(state["optimizer"], id_map, exclude_keys="step")
        state["optimizer"]["state"]["common_step"] = step
        state["fp32_from_fp16_params"] = [
            make_sharded_optimizer_tensor(id_map[i], master, prefix="optimizer.state.fp32_param")
            for i, (param, master) in enumerate(self.pairs) if param is not master]
        if self.loss_scaler is not None:
            state["grad_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer_state = state["optimizer"]
        step = optimizer_state["state"].pop("common_step")
        for param_state in optimizer_state["state"].values():
            param_state["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        self.optimizer.load_state_dict(optimizer_state)
        masters = iter(state["fp32_from_fp16_params"])
        with torch.no_grad():
            for param, master in self.pairs:
                if param is not master:
                    master.copy_(next(masters))
        if self.loss_scaler is not None and "grad_scaler" in state:
            self.loss_scaler.load_state_dict(state["grad_scaler"])


def _megatron_optimizer(ddp: DistributedDataParallel, cfg: OptimConfig,
                        dtype: torch.dtype) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        loss_scale=cfg.loss_scale or None, initial_loss_scale=cfg.initial_loss_scale,
        min_loss_scale=cfg.min_loss_scale, loss_scale_window=cfg.loss_scale_window,
        hysteresis=cfg.hysteresis, use_distributed_optimizer=cfg.use_distributed_optimizer,
        clip_grad=cfg.grad_clip)
    return get_megatron_optimizer(config, [ddp])


@dataclasses.dataclass
class StudentOptimizer:
    """The student's DDP wrapper, optimizer and scheduler, and one optimizer step's phases.

    ``begin_step(k)`` → backward of every micro batch (scaled by :meth:`loss_scale`) →
    ``finish_gradients()`` (→ grad norm, or None when fp16 overflowed and the step is
    skipped) → ``apply()``. Callers stop between the last two on a non-finite norm.
    """

    ddp: DistributedDataParallel
    optimizer: Any
    """megatron's optimizer (CUDA) or :class:`CpuMixedPrecisionAdam`."""
    scheduler: OptimizerParamScheduler
    grad_clip: float

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def loss_scale(self) -> float:
        return float(self.optimizer.get_loss_scale())

    def begin_step(self, step: int) -> None:
        """Zero gradients; set lr and weight decay for optimizer step ``step`` (0-based)."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.scheduler.num_steps = step
        self.scheduler.step(1)

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one backward: with ``enabled`` False, megatron DDP only accumulates
        (``no_sync``); the step's last backward runs with it True, so the overlapped bucket
        reduction starts there."""
        return contextlib.nullcontext() if enabled else self.ddp.no_sync()

    def finish_gradients(self) -> float | None:
        """Reduce, unscale and clip the accumulated gradients (collective); return the global
        gradient norm before clipping, or None when fp16 loss scaling found an overflow."""
        finalize_model_grads([self.ddp])
        if self.optimizer.prepare_grads():
            return None
        if self.grad_clip > 0:
            return float(self.optimizer.clip_grad_norm(self.grad_clip))
        return float(self.optimizer.get_grad_norm())

    def apply(self) -> None:
        self.optimizer.step_with_ready_grads()

    def sharded_state_dict(self, model: torch.nn.Module, is_loading: bool = False) -> dict:
        return self.optimizer.sharded_state_dict(model.sharded_state_dict(),
                                                 is_loading=is_loading)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int
                    ) -> StudentOptimizer:
    """Wrap ``model`` (megatron DDP, fp32 gradient buffers) and build its optimizer and
    scheduler for a run of ``total_steps`` optimizer steps; see the module docstring."""
    dtype = next(p.dtype for p in model.parameters())
    on_gpu = torch.cuda.is_available()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=on_gpu,
        use_distributed_optimizer=on_gpu and cfg.use_distributed_optimizer)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    if on_gpu:
        optimizer = _megatron_optimizer(ddp, cfg, dtype)
    else:
        if cfg.use_distributed_optimizer and _data_parallel_size() > 1:
            logger.info("megatron's distributed optimizer needs CUDA: each CPU rank keeps the "
                        "full fp32 master weights and moments")
        group = (parallel_state.get_model_parallel_group()
                 if parallel_state.model_parallel_is_initialized() else None)
        optimizer = CpuMixedPrecisionAdam(model, cfg, grad_stats_group=group)
    return StudentOptimizer(ddp, optimizer, lr_scheduler(optimizer, cfg, total_steps),
                            cfg.grad_clip)


def _data_parallel_size() -> int:
    return (parallel_state.get_data_parallel_world_size()
            if parallel_state.model_parallel_is_initialized() else 1)


def data_parallel_group() -> dist.ProcessGroup | None:
    """The student's data-parallel group (None in a world of one)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group()
