"""ModelOpt quant backend ``"nemo_opd_cpu"``: MX and NVFP4 fake quantization for CPU tensors.

Why: ModelOpt 0.47 fake-quantizes dynamic-block formats — MXFP4, MXFP8 (E8M0 block scales) and
NVFP4 (E4M3 block scales) — only with CUDA kernels, so on a CPU the first forward of a model
quantized with ``mtq.MXFP4_DEFAULT_CFG``, ``mtq.MXFP8_DEFAULT_CFG``, ``mtq.W4A8_MXFP4_FP8_CFG`` or
``mtq.NVFP4_DEFAULT_CFG`` fails (``modelopt_cuda_ext_mx`` needs CUDA; NVFP4 asserts a CUDA amax).

How, without patching ModelOpt: ModelOpt's public hook ``register_quant_backend(name, entrypoint)``.
A ``TensorQuantizer`` whose ``backend`` attribute names a registered backend hands its fake
quantization to ``entrypoint(inputs, quantizer)``. This module

* registers :data:`BACKEND_NAME` when it is imported (importing ``nemo_opd.quant`` does that);
* :func:`enable_cpu_quant_backend` copies an ``mtq`` config and sets ``backend=BACKEND_NAME`` on
  every dynamic-block MXFP4 / MXFP8 / NVFP4 quantizer entry — users keep ModelOpt's presets;
* :func:`cpu_fake_quant`, the entry point, runs :mod:`nemo_opd.quant.mx_numerics` (ModelOpt's
  CUDA-kernel arithmetic in plain torch) for tensors that are not on CUDA, wrapped in the same
  straight-through gradient ModelOpt uses, and hands CUDA tensors back to ModelOpt's own kernels
  unchanged. The same config therefore runs on CPU and on GPU.

What this reads from a ``TensorQuantizer`` beyond its public properties (``num_bits``,
``block_sizes``, ``backend_extra_args``): ``_get_amax`` (the NVFP4 global amax exactly as
ModelOpt's own path gets it), ``_pass_through_bwd`` (gradient mode) and ``_fake_quantize``
(ModelOpt's own path, called with ``backend`` switched off for that one call). The tests pin each.

The backend name is part of the quantizer config, so it is saved with ``mto`` state; a restored
model needs ``import nemo_opd.quant`` before its first forward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any, Literal

import torch
from modelopt.torch.quantization.config import normalize_quant_cfg_list
from modelopt.torch.quantization.nn import (
    TensorQuantizer,
    is_registered_quant_backend,
    register_quant_backend,
)

from nemo_opd.quant.mx_numerics import mx_fake_quant, nvfp4_fake_quant

__all__ = [
    "BACKEND_NAME",
    "DynamicBlockFormat",
    "cpu_fake_quant",
    "enable_cpu_quant_backend",
    "dynamic_block_format",
    "register_cpu_quant_backend",
]

BACKEND_NAME = "nemo_opd_cpu"
"""Name under which :func:`cpu_fake_quant` is registered with ModelOpt."""

DynamicBlockFormat = Literal["mxfp4", "mxfp8", "nvfp4"]

# backend_extra_args the backend understands. None today: every knob of these formats already
# has a QuantizerAttributeConfig field, and an ignored argument would be a silent wrong answer.
_KNOWN_EXTRA_ARGS: frozenset[str] = frozenset()


def dynamic_block_format(num_bits: Any, block_sizes: Mapping | None) -> DynamicBlockFormat | None:
    """Which format this backend implements for a quantizer config, or None if it does not.

    MX formats: ``block_sizes={-1: bs, "type": "dynamic", "scale_bits": (8, 0)}`` with
    ``num_bits=(2, 1)`` (MXFP4) or ``(4, 3)`` (MXFP8). NVFP4: ``num_bits=(2, 1)`` with
    ``"scale_bits": (4, 3)``, dynamic. Static-block quantizers (e.g. ModelOpt's MSE-calibrated
    NVFP4) and other MX element types (MXFP6, MXINT8) return None.
    """
    if not block_sizes or block_sizes.get("type") != "dynamic":
        return None
    num_bits = tuple(num_bits) if isinstance(num_bits, (list, tuple)) else num_bits
    scale_bits = block_sizes.get("scale_bits")
    scale_bits = tuple(scale_bits) if isinstance(scale_bits, (list, tuple)) else scale_bits
    return {
        ((2, 1), (8, 0)): "mxfp4",
        ((4, 3), (8, 0)): "mxfp8",
        ((2, 1), (4, 3)): "nvfp4",
    }.get((num_bits, scale_bits))


def _check_extra_args(extra_args: Mapping | None, where: str) -> None:
    unknown = sorted(set(extra_args or {}) - _KNOWN_EXTRA_ARGS)
    if unknown:
        raise ValueError(
            f"{where}: backend {BACKEND_NAME!r} got unknown backend_extra_args {unknown}; "
            f"it accepts {sorted(_KNOWN_EXTRA_ARGS) or 'none'}"
        )


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with ModelOpt's straight-through gradient.

    ``clip_amax=None``: identity gradient (``pass_through_bwd=True``, ModelOpt's default and
    forced for MX). Otherwise the gradient is zeroed where ``|x| > clip_amax``, as ModelOpt's
    ``_fake_tensor_quant_backward`` does.
    """

    @staticmethod
    def forward(ctx, inputs, fake_quant, clip_amax):
        if clip_amax is not None:
            ctx.save_for_backward(inputs, clip_amax)
        return fake_quant(inputs)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.saved_tensors:
            return grad_output, None, None
        inputs, clip_amax = ctx.saved_tensors
        grad = torch.where(inputs.abs() <= clip_amax, grad_output, grad_output.new_zeros(()))
        return grad, None, None


@contextlib.contextmanager
def _modelopt_path(quantizer: TensorQuantizer) -> Iterator[None]:
    """Switch the quantizer's backend off so ``_fake_quantize`` runs ModelOpt's own kernels."""
    backend = quantizer.backend
    quantizer.backend = None
    try:
        yield
    finally:
        quantizer.backend = backend


def _on_modelopt_kernels(inputs: torch.Tensor) -> bool:
    """True where ModelOpt's own CUDA kernels exist for the input (CUDA tensors)."""
    return inputs.is_cuda


def cpu_fake_quant(inputs: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
    """ModelOpt backend entry point: fake-quantize ``inputs`` as ``quantizer`` is configured.

    Non-CUDA tensors: :func:`~nemo_opd.quant.mx_numerics.mx_fake_quant` (MXFP4, MXFP8) or
    :func:`~nemo_opd.quant.mx_numerics.nvfp4_fake_quant` (NVFP4, global amax from the quantizer:
    its calibrated amax, else ``max |inputs|``), with ModelOpt's straight-through gradient.
    CUDA tensors: ModelOpt's own fake quantization, unchanged.

    Args:
        inputs: tensor to fake-quantize, ``[..., n]``; blocks run along the last dim.
        quantizer: the calling ``TensorQuantizer``.

    Returns:
        Tensor of the same shape and dtype as ``inputs``.

    Raises:
        ValueError: the quantizer is not a dynamic-block MXFP4 / MXFP8 / NVFP4 quantizer, has no
            last-dim block size, or carries unknown ``backend_extra_args``.
    """
    fmt = dynamic_block_format(quantizer.num_bits, quantizer.block_sizes)
    if fmt is None:
        raise ValueError(
            f"backend {BACKEND_NAME!r} implements dynamic-block MXFP4, MXFP8 and NVFP4 only; got "
            f"num_bits={quantizer.num_bits}, block_sizes={quantizer.block_sizes}"
        )
    _check_extra_args(quantizer.backend_extra_args, "TensorQuantizer")
    if _on_modelopt_kernels(inputs):
        with _modelopt_path(quantizer):
            return quantizer._fake_quantize(inputs)

    # The same lookup as ModelOpt's dynamic-block path.
    block_size = quantizer.block_sizes.get(-1) or quantizer.block_sizes.get(inputs.dim() - 1)
    if block_size is None:
        raise ValueError(f"block_sizes {quantizer.block_sizes} has no entry for the last dim")

    fake_quant: Callable[[torch.Tensor], torch.Tensor]
    clip_amax = None
    if fmt == "nvfp4":
        amax = quantizer._get_amax(inputs)
        # ModelOpt reduces a per-channel amax to one global amax the same way.
        fake_quant = partial(nvfp4_fake_quant, global_amax=amax.amax(), block_size=block_size)
        if not quantizer._pass_through_bwd:
            clip_amax = amax
    else:  # MX: ModelOpt forces pass_through_bwd, so the gradient is always the identity
        element_format = "e2m1" if fmt == "mxfp4" else "e4m3"
        fake_quant = partial(mx_fake_quant, element_format=element_format, block_size=block_size)
    return _FakeQuantSTE.apply(inputs, fake_quant, clip_amax)


def _with_backend(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """One quantizer attribute dict → the same with our backend if it is MX / NVFP4."""
    if dynamic_block_format(cfg.get("num_bits"), cfg.get("block_sizes")) is None:
        return cfg
    if cfg.get("backend") not in (None, BACKEND_NAME):
        raise ValueError(f"{where}: already selects backend {cfg['backend']!r}")
    _check_extra_args(cfg.get("backend_extra_args"), where)
    return {**cfg, "backend": BACKEND_NAME}


def enable_cpu_quant_backend(config: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of an ``mtq.quantize`` config whose MX / NVFP4 quantizers use :data:`BACKEND_NAME`.

    Every ``quant_cfg`` entry whose attribute config (or, for sequential quantizers, any element
    of its list) is a dynamic-block MXFP4, MXFP8 or NVFP4 quantizer gets ``backend="nemo_opd_cpu"``;
    all other entries, and all other keys of ``config`` (``algorithm``, ...), are unchanged.
    ``quant_cfg`` may be in any shape ModelOpt accepts (list of entries, legacy dict); the result
    uses the list-of-entries shape. Safe to use on GPU too: CUDA tensors still run ModelOpt's
    kernels. A config without such quantizers comes back as an equivalent copy.

    Args:
        config: an ``mtq`` config such as ``mtq.NVFP4_DEFAULT_CFG``; not modified.

    Returns:
        A new config dict.

    Raises:
        ValueError: ``config`` has no ``quant_cfg``, or an MX / NVFP4 entry already selects
            another backend or carries ``backend_extra_args`` this backend does not know.
    """
    if "quant_cfg" not in config:
        raise ValueError(f"config must have a 'quant_cfg' key; got keys {sorted(config)}")
    entries = []
    for entry in normalize_quant_cfg_list(config["quant_cfg"]):
        raw = entry.model_dump(exclude_unset=True)
        cfg = raw.get("cfg")
        where = f"quant_cfg entry {raw['quantizer_name']!r}"
        if isinstance(cfg, list):
            raw["cfg"] = [_with_backend(c, where) for c in cfg]
        elif cfg is not None:
            raw["cfg"] = _with_backend(cfg, where)
        entries.append(raw)
    rest = {key: copy.deepcopy(value) for key, value in config.items() if key != "quant_cfg"}
    return {**rest, "quant_cfg": entries}


def register_cpu_quant_backend() -> None:
    """Register :func:`cpu_fake_quant` with ModelOpt as :data:`BACKEND_NAME` (idempotent)."""
    if not is_registered_quant_backend(BACKEND_NAME):
        register_quant_backend(BACKEND_NAME, cpu_fake_quant)


register_cpu_quant_backend()
