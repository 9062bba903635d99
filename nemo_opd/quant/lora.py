"""LoRA adapters on the quantized student, with ModelOpt's PEFT (``modelopt.torch.peft``).

``add_lora(model)`` puts rank-``r`` adapters (seed default r = 32, alpha = 64) on every
q/k/v, o, gate/up and down projection of a megatron-core ``GPTModel`` (``linear_qkv``,
``linear_proj``, ``linear_fc1``, ``linear_fc2``) through ``mtpf.update_model``. ModelOpt's PEFT
registers LoRA classes for its *quantized* megatron linears, so on a QAT student the base
forward keeps its fake quantization and the adapters add ``(alpha / r) * B(A(x))`` in high
precision::

    y = x @ Q(W)^T + (alpha / r) * (x @ A^T) @ B^T          A: [r, in], B: [out, r]

At TP > 1 the adapters follow the base layer: for a column-parallel linear ``A`` is replicated
and ``B`` is column-parallel; for a row-parallel one ``A`` is row-parallel and ``B`` replicated.
ModelOpt initialises each rank's replicated half from that rank's RNG; :func:`add_lora`
broadcasts it within the TP group so all ranks hold one adapter.

Only adapters train: ModelOpt sets ``requires_grad=False`` on every base parameter; quantizer
state (amax) is buffers, which no optimizer sees. :func:`merge_lora` folds the adapters into the
base weights and re-quantizes them (merge-then-requantize, see ``docs/quantization.md``), so the
model can be exported as a plain quantized checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

__all__ = ["LoraConfig", "LORA_TARGETS", "add_lora", "lora_parameters", "has_lora_adapters",
           "merge_lora"]

logger = logging.getLogger(__name__)

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""megatron names of q/k/v (fused), o, gate/up (fused) and down."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters for :func:`add_lora`."""

    rank: int = 32
    """Inner dimension r of ``B @ A``."""
    alpha: float = 64.0
    """Adapter output is scaled by ``alpha / rank``."""
    targets: tuple[str, ...] = LORA_TARGETS
    """Last name component of the linears that get adapters (megatron names)."""
    adapter_name: str = "default"
    """ModelOpt adapter name (parameters are ``<linear>.lora_a_<name>`` / ``lora_b_<name>``)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("LoraConfig.targets must name at least one linear")
        if not self.adapter_name.isidentifier():
            raise ValueError(f"LoraConfig.adapter_name must be an identifier, got "
                             f"{self.adapter_name!r}")

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


def _lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from modelopt.torch.peft.lora.layer import LoRAModule

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoRAModule) and module._lora_adapters]


def has_lora_adapters(model: torch.nn.Module) -> bool:
    """True if any module of ``model`` carries an (unmerged) LoRA adapter."""
    return bool(_lora_modules(model))


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters (what the optimizer of a LoRA run gets)."""
    return [param for _, module in _lora_modules(model)
            for adapter in module._lora_adapters.values()
            for part in (adapter["lora_a"], adapter["lora_b"]) for param in part.parameters()]


def _is_replicated(part: torch.nn.Module) -> bool:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return not isinstance(part, (ColumnParallelLinear, RowParallelLinear))


def add_lora(model: torch.nn.Module, config: LoraConfig | None = None) -> torch.nn.Module:
    """Add LoRA adapters to ``model`` (in place) and freeze everything else.

    Args:
        model: a megatron-core ``GPTModel``, normally quantized already
            (:func:`~nemo_opd.quant.quantize_student`); any TP size.
        config: adapter shape and targets; default r = 32, alpha = 64 on q/k/v/o/gate/up/down.

    Returns:
        ``model``; its trainable parameters are exactly :func:`lora_parameters`.

    Raises:
        ValueError: no linear matched ``config.targets``, or the model already has adapters
            (merge them first).
    """
    import modelopt.torch.peft as mtpf

    config = config or LoraConfig()
    if has_lora_adapters(model):
        raise ValueError("model already has LoRA adapters; merge_lora(model) before adding new "
                         "ones")
    adapter = {"rank": config.rank, "scale": config.scale, "enable": True}
    # ModelOpt applies the patterns in order, later ones winning; it adds an adapter only where
    # the merged settings say enable=True explicitly.
    adapter_cfg = {"*": {"enable": False}, **{f"*.{target}": adapter for target in config.targets}}
    mtpf.update_model(model, {"adapter_name": config.adapter_name, "adapter_cfg": adapter_cfg,
                              "freeze_base_model": True, "freeze_lora_weights": False})
    modules = _lora_modules(model)
    if not modules:
        raise ValueError(f"no linear of the model is named like {config.targets}")
    with torch.no_grad():
        for _, module in modules:
            group = module.tp_group
            if group is None or dist.get_world_size(group) == 1:
                continue
            parts = module._lora_adapters[config.adapter_name]
            for part in (parts["lora_a"], parts["lora_b"]):
                if _is_replicated(part):
                    dist.broadcast(part.weight.data, src=dist.get_global_rank(group, 0),
                                   group=group)
    logger.info("LoRA r=%d alpha=%g on %d linears (%d adapter parameters)", config.rank,
                config.alpha, len(modules), sum(p.numel() for p in lora_parameters(model)))
    return model


def _recalibrate_weight_amax(module: torch.nn.Module) -> None:
    """Re-run the weight quantizer's max calibration on the (merged) weight.

    What ModelOpt's ``max_calibrate`` does for weights (``enable_stats_collection``,
    ``weight_quantizer(weight)``, ``finish_stats_collection``), for this one quantizer so the
    input quantizers' calibrated amax stay as they are. A per-tensor amax is then the max over
    the TP group, as ModelOpt's calibration synchronises it; block amaxes are rank-local.
    Dynamic formats without a stored amax (MXFP4) need nothing.
    """
    quantizer = module.weight_quantizer
    if not quantizer.is_enabled or getattr(quantizer, "_amax", None) is None:
        return
    quantizer.reset_amax()
    quantizer.disable_quant()
    quantizer.enable_calib()
    quantizer(module.weight)
    quantizer.load_calib_amax()
    quantizer.enable_quant()
    quantizer.disable_calib()
    group = module.tp_group
    if quantizer.amax.numel() == 1 and group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(quantizer._amax, op=dist.ReduceOp.MAX, group=group)


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every enabled adapter into its base weight, re-quantize, and remove all adapters.

    Per linear, on each rank's shard (float32 arithmetic, cast once to the weight dtype)::

        W <- W + sum_adapters (alpha / r) * B @ A

    then the weight quantizer is re-calibrated on the merged ``W`` (static amax: INT4 blocks,
    FP8 / NVFP4 per-tensor) so the deployed codes are the merged weight quantized by the same
    quantizers. Disabled adapters are dropped without merging (they did not act on the output).

    Returns:
        Number of linears merged.
    """
    merged = 0
    with torch.no_grad():
        for _, module in _lora_modules(model):
            delta = torch.zeros(module.weight.shape, dtype=torch.float32,
                                device=module.weight.device)
            for name, adapter in list(module._lora_adapters.items()):
                if adapter["enable"]:
                    lora_a, lora_b = adapter["lora_a"].weight, adapter["lora_b"].weight
                    delta += adapter["scale"] * (lora_b.float() @ lora_a.float())
                delattr(module, f"lora_a_{name}")
                delattr(module, f"lora_b_{name}")
                del module._lora_adapters[name]
            module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
            if hasattr(module, "weight_quantizer"):
                _recalibrate_weight_amax(module)
            merged += 1
    logger.info("merged LoRA adapters into %d linears", merged)
    return merged
