"""Quantization formats by name, as data: each maps to a ModelOpt preset config.

``quant_config("int4")`` returns a deep copy of the ModelOpt config the format stands for, with
the module selection applied (by default every linear in the transformer blocks is quantized;
embeddings and the output layer stay in high precision, as ModelOpt's presets do). Any raw
ModelOpt config (a dict, or a YAML file holding one) passes through unchanged for formats not
listed here.

The table of formats, what each quantizes and which GPUs serve it is in ``docs/quantization.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import warnings
from pathlib import Path
from typing import Any

__all__ = ["QuantFormat", "FORMATS", "GPU_GENERATIONS", "get_format", "quant_config",
           "check_deployable"]

GPU_GENERATIONS = ("hopper", "blackwell")
"""Ordered oldest first: a format served on Hopper is served on Blackwell too."""


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One named quantization format."""

    name: str
    modelopt_preset: str
    """Attribute of ``modelopt.torch.quantization`` holding the preset config."""
    description: str
    weight_block_size: int | None
    """Elements per scale along a weight's input dimension (None: per tensor/channel)."""
    min_gpu: str
    """Oldest GPU generation on which TensorRT-LLM serves the format."""
    quantize_inputs: bool = True
    """False: drop the preset's input (activation) quantizers, leaving weight-only."""
    dynamic_block: bool = False
    """MX/NVFP4 dynamic block quantization (ModelOpt's kernel is CUDA-only; see cpu_backend)."""


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("mxfp4", "MXFP4_DEFAULT_CFG", "MXFP4 weights (block 32, E8M0 scales), 16-bit "
                "activations", 32, "blackwell", quantize_inputs=False, dynamic_block=True),
    QuantFormat("mxfp4_w4a4", "MXFP4_DEFAULT_CFG", "MXFP4 weights and activations", 32,
                "blackwell", dynamic_block=True),
    QuantFormat("int4", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4 weights, block 128 (W4A16)", 128,
                "hopper"),
    QuantFormat("int4_awq", "INT4_AWQ_CFG", "INT4 AWQ weights, block 128 (W4A16)", 128, "hopper"),
    QuantFormat("w4a8_awq", "W4A8_AWQ_BETA_CFG", "INT4 AWQ weights, FP8 activations", 128,
                "hopper"),
    QuantFormat("nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4 weights and activations (block 16, FP8 "
                "E4M3 scales + FP32 global scale)", 16, "blackwell", dynamic_block=True),
    QuantFormat("nvfp4_w4a16", "W4A16_NVFP4_CFG", "NVFP4 weights, 16-bit activations", 16,
                "blackwell", dynamic_block=True),
    QuantFormat("fp8", "FP8_DEFAULT_CFG", "FP8 E4M3 weights and activations, per tensor", None,
                "hopper"),
)}


def get_format(name: str) -> QuantFormat:
    """The named format; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return FORMATS[name]
    except KeyError:
        close = difflib.get_close_matches(name, FORMATS, n=2)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown quantization format {name!r}{hint}; valid formats: "
                         f"{', '.join(FORMATS)}, or a ModelOpt config dict / YAML path") from None


def _preset_config(spec: QuantFormat) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, spec.modelopt_preset))
    if not spec.quantize_inputs:
        config["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
    return config


def _load_raw(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"ModelOpt quantization config file {path} does not exist")
    import yaml

    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or "quant_cfg" not in loaded:
        raise ValueError(f"{path} does not hold a ModelOpt config (a mapping with 'quant_cfg')")
    return loaded


def quant_config(fmt: str | dict[str, Any] | Path, *, quantize_output_layer: bool = False,
                 exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ModelOpt config for ``fmt`` with module selection applied.

    Args:
        fmt: a name from :data:`FORMATS`, a raw ModelOpt config dict, or a path (``Path``, or a
            string ending in ``.yaml``/``.yml``) to a YAML file holding one.
        quantize_output_layer: also quantize ``output_layer`` (the presets keep it in high
            precision; TensorRT-LLM serves it either way).
        exclude: extra module-name wildcards (ModelOpt syntax, e.g. ``"*layers.0.*"``) whose
            quantizers are disabled.
    """
    if isinstance(fmt, str) and not fmt.endswith((".yaml", ".yml")):
        config = _preset_config(get_format(fmt))
    else:
        config = _load_raw(fmt)
    rules = config["quant_cfg"]
    if quantize_output_layer:
        # Later rules win in ModelOpt's ordered list; re-enable what the preset disabled.
        rules[:] = [r for r in rules if r.get("quantizer_name") != "*output_layer*"]
    rules.extend({"quantizer_name": pattern, "enable": False} for pattern in exclude)
    return config


def check_deployable(fmt: str, target_gpu: str | None) -> None:
    """Warn when TensorRT-LLM cannot serve ``fmt`` on ``target_gpu`` (``"hopper"``, ...)."""
    if target_gpu is None or fmt not in FORMATS:
        return
    if target_gpu not in GPU_GENERATIONS:
        raise ValueError(f"unknown target GPU generation {target_gpu!r}; "
                         f"choose from {GPU_GENERATIONS}")
    needed = FORMATS[fmt].min_gpu
    if GPU_GENERATIONS.index(target_gpu) < GPU_GENERATIONS.index(needed):
        warnings.warn(f"TensorRT-LLM serves {fmt!r} only on {needed.capitalize()} or newer GPUs, "
                      f"not on {target_gpu.capitalize()}; the exported checkpoint will not run "
                      "there", stacklevel=2)
