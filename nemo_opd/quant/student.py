"""The quantized student: ModelOpt fake quantizers inserted into a megatron-core GPTModel.

``quantize_student(model, "int4", forward_loop)`` checks that the format fits the model (block
sizes against every local weight shard, before any work), makes MX/NVFP4 runnable on CPU
tensors (:mod:`nemo_opd.quant.cpu_backend`), runs ModelOpt's ``mtq.quantize`` (PTQ calibration
when ``forward_loop`` is given; at TP > 1 ModelOpt's Megatron plugin synchronises amax across the
TP group), and fails fast when no weight quantizer ended up enabled. The result trains with
straight-through gradients (QAT).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from nemo_opd.console import third_party_prints_off
from nemo_opd.quant.formats import FORMATS, check_deployable, quant_config

__all__ = ["quantize_student", "check_block_sizes", "enabled_quantizers", "weights_quantized_once"]

logger = logging.getLogger(__name__)


def check_block_sizes(model: torch.nn.Module, fmt: str, *,
                      quantize_output_layer: bool = False) -> None:
    """Raise ``ValueError`` if a quantized linear's local input dim is not a multiple of the
    format's block size.

    Padding is not done: a padded block would quantize zeros the exported checkpoint does not
    hold, and TensorRT-LLM's kernels assume whole blocks. The message names each layer, its
    local input dimension (after TP sharding) and the block size.
    """
    block = FORMATS[fmt].weight_block_size if fmt in FORMATS else None
    if not block:
        return
    bad = [f"{name} (local input dim {module.weight.shape[-1]})"
           for name, module in model.named_modules()
           if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
           and (quantize_output_layer or not name.endswith("output_layer"))
           and module.weight.shape[-1] % block]
    if bad:
        raise ValueError(
            f"format {fmt!r} quantizes weights in blocks of {block} along the input dimension, "
            f"which does not divide: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. "
            "Use a tensor-parallel size that keeps each shard a multiple of the block, or "
            "exclude those layers (exclude=...)."
        )


def enabled_quantizers(model: torch.nn.Module) -> dict[str, list[str]]:
    """Names of enabled ``weight``/``input``/``output`` quantizers, by kind."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    found: dict[str, list[str]] = {"weight": [], "input": [], "output": []}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            for kind in found:
                if name.endswith(f"{kind}_quantizer"):
                    found[kind].append(name)
    return found


def quantize_student(model: torch.nn.Module, fmt: str | dict[str, Any] | Path,
                     forward_loop: Callable[[torch.nn.Module], None] | None = None, *,
                     quantize_output_layer: bool = False, exclude: tuple[str, ...] = (),
                     target_gpu: str | None = None) -> torch.nn.Module:
    """Insert ModelOpt quantizers for ``fmt`` into ``model`` (in place) and calibrate them.

    Args:
        model: a megatron-core ``GPTModel`` (any TP size).
        fmt: a format name (:data:`nemo_opd.quant.formats.FORMATS`) or a raw ModelOpt config.
        forward_loop: runs calibration batches through the model (PTQ); None skips calibration
            (dynamic formats need none; static ones then calibrate lazily on first use).
        quantize_output_layer, exclude: module selection, see :func:`quant_config`.
        target_gpu: ``"hopper"``/``"blackwell"``: warn if TensorRT-LLM cannot serve ``fmt`` there.

    Raises:
        ValueError: unknown format, block sizes that do not divide a layer, or a config that left
            no weight quantizer enabled.
    """
    import modelopt.torch.quantization as mtq

    from nemo_opd.quant.cpu_backend import enable_cpu_quant_backend

    config = quant_config(fmt, quantize_output_layer=quantize_output_layer, exclude=exclude)
    # MX/NVFP4 quantizers go through our backend, which runs ModelOpt's own kernels on CUDA
    # tensors and our CPU implementation otherwise: one config, portable checkpoints.
    config = enable_cpu_quant_backend(config)
    if isinstance(fmt, str):
        check_deployable(fmt, target_gpu)
        check_block_sizes(model, fmt, quantize_output_layer=quantize_output_layer)
    # ModelOpt prints "Inserted N quantizers"; the count is logged below, per kind.
    with third_party_prints_off():
        mtq.quantize(model, config, forward_loop)
    quantizers = enabled_quantizers(model)
    if not quantizers["weight"]:
        raise ValueError(f"quantization config {fmt!r} enabled no weight quantizer in the model; "
                         "check its quantizer_name patterns against the model's module names")
    logger.info("quantized student with %s: %d weight, %d input quantizers", fmt,
                len(quantizers["weight"]), len(quantizers["input"]))
    return model


@contextlib.contextmanager
def weights_quantized_once(model: torch.nn.Module) -> Iterator[int]:
    """While the weights are fixed (rollouts: no grad, no optimizer step), quantize every weight
    once instead of on every forward; yields how many weights were quantized.

    ModelOpt's quantized linears call ``weight_quantizer(weight)`` on the parameter in each
    forward (megatron's parallel linears through the replaced linear functional, ``nn.Linear``
    through the dynamic ``weight`` attribute), so a decode loop re-quantizes every weight for
    every token. Here each enabled weight quantizer is called once on its parameter, its output
    stands in for the parameter's data, and the quantizer is disabled (a disabled
    ``TensorQuantizer`` passes its input through): the forwards compute the same tensors, bit
    for bit. Input/output (activation) quantizers are untouched.

    A quantized module whose quantizers are then all disabled (weight-only formats) and that
    holds no LoRA adapter computes exactly what its original class computes, so for the block it
    runs *as* that class (``DynamicModule.get_original_cls_by_level(0)``, what ModelOpt's own
    ``export`` converts to for good): ModelOpt's per-forward dispatch (dynamic attribute lookups,
    the replaced linear functional, pass-through quantizer calls) costs more than the matmuls of
    a decoding step. Modules with an enabled activation quantizer or LoRA adapters keep their
    quantized class.

    On exit every module gets its class back, every parameter its own data and every quantizer
    is enabled again. Cost: one extra copy of the quantized weights while the block runs. Models
    without weight quantizers pass through unchanged (0).
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    swapped: list[tuple[torch.nn.Parameter, torch.Tensor, TensorQuantizer]] = []
    classes: list[tuple[torch.nn.Module, type]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                quantizer = getattr(module, "weight_quantizer", None)
                parameter = module._parameters.get("weight") if hasattr(module, "_parameters") \
                    else None
                if (not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled
                        or parameter is None):
                    continue
                quantized = quantizer(parameter)
                swapped.append((parameter, parameter.data, quantizer))
                parameter.data = quantized
                quantizer.disable()
            for module in model.modules():
                plain = _plain_class(module)
                if plain is not None:
                    classes.append((module, type(module)))
                    module.__class__ = plain
        yield len(swapped)
    finally:
        for module, cls in classes:
            module.__class__ = cls
        for parameter, data, quantizer in swapped:
            parameter.data = data
            quantizer.enable()


def _plain_class(module: torch.nn.Module) -> type | None:
    """The original (non-ModelOpt) class ``module`` computes the same as right now, or None:
    a quantized module without LoRA adapters all of whose quantizers (nested ones too, e.g. a
    ``SequentialQuantizer``'s) pass their input through unchanged."""
    from modelopt.torch.opt.dynamic import DynamicModule
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantModule

    if not isinstance(module, QuantModule) or getattr(module, "_lora_adapters", None):
        return None
    if any(isinstance(q, TensorQuantizer) and not _passes_through(q) for q in module.modules()):
        return None
    plain = module.get_original_cls_by_level(0)
    return None if issubclass(plain, DynamicModule) else plain


def _passes_through(quantizer: Any) -> bool:
    """A disabled ``TensorQuantizer`` still applies an AWQ/SmoothQuant ``pre_quant_scale`` and
    rotations in its forward; only one with neither returns its input as it is."""
    return (not quantizer.is_enabled and quantizer.pre_quant_scale is None
            and not quantizer.rotate_is_enabled and not quantizer.rotate_back_is_enabled)
