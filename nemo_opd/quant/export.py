"""Export the QAT student to a ModelOpt unified Hugging Face checkpoint with the trained codes.

``export_student(model, hf_model_dir, export_dir)`` writes what TensorRT-LLM (>= 1.2) loads with
``LLM(model=export_dir)``: packed low-bit weights, their scales, ``hf_quant_config.json``, a
``config.json`` carrying ``quantization_config``, and the tokenizer files. ModelOpt's own
``GPTModelExporter`` (the engine of ``export_mcore_gpt_to_hf``) does the layout work — HF names,
the q/k/v and gate/up splits, unquantized tensors, configs — and we replace the quantized
weights and scales it computed by the codes the student trained against, before it writes them.

Why replace them (measured on the tiny models, see ``docs/quantization.md``): ModelOpt's exporter
re-quantizes each weight with arithmetic that is not the fake quantization QAT used:

* it casts the weight to the export dtype (bf16) *before* computing scales and codes, which moves
  fp32 elements across rounding boundaries and changes weight-derived block scales (MXFP4, NVFP4);
* INT4 and FP8 codes are ``w / (amax / qmax)`` where the fake quantization computes
  ``w * (qmax / amax)`` (different float rounding at the decision boundaries; FP8's 0-dim scale
  even makes the division run in bf16);
* MXFP4 (``MXFP4QTensor``) rounds E2M1 ties down and takes the block exponent from a float32
  ``log2``, where the QAT kernel rounds ties to even and uses an exact ``ceil(log2(amax/6))``.

Here the codes are instead *read off the student's own fake-quantized weight*: ``w_q =
weight_quantizer(weight)`` is exactly what every forward of the student used (whatever kernel
produced it: the CPU backend or ModelOpt's CUDA kernels), and ``w_q / scale`` lies on the
format's grid up to the rounding of ``w_q`` to the student dtype. Scales come from the same
arithmetic as the fake quantization (INT4/FP8/NVFP4: ModelOpt's own scale functions fed the
student-dtype weight; MXFP4: the kernel's exact exponent). Every decoded code is checked to sit
within 1/64 of its grid point, so a code cannot be off by one step without an error.

Scope: megatron-core ``GPTModel`` students (Llama / Qwen2 / Qwen3 layouts) at TP = PP = 1 with
weight formats INT4 (blockwise, no AWQ pre-quant scale), FP8 (per tensor), MXFP4 and NVFP4. A
TP > 1 student is first saved with :func:`nemo_opd.models.checkpoint.save_model_checkpoint` and
restored at TP = 1 in one process (tested exact), then exported. Needs an initialised
``torch.distributed`` (e.g. inside :func:`nemo_opd.runtime.distributed_runtime`), as ModelOpt's
exporter synchronises with barriers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch

from nemo_opd.quant.modelopt_fixes import modelopt_exporter_class
from nemo_opd.quant.mx_numerics import (
    E2M1_MAX,
    e8m0_scale_exponent,
    round_to_e2m1,
    round_to_e4m3,
)
from nemo_opd.runtime import is_rank0

__all__ = [
    "WeightFormat",
    "QuantizedWeight",
    "ExportResult",
    "TOKENIZER_FILES",
    "weight_format",
    "student_weight_codes",
    "modelopt_exporter_class",
    "export_student",
    "export_full_precision",
]

logger = logging.getLogger(__name__)

WeightFormat = Literal["int4", "fp8", "mxfp4", "nvfp4"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
"""Files copied from ``tokenizer_dir`` into the export (those that exist)."""

# A decoded code may sit this far (in units of max(|code|, smallest nonzero code)) from its grid
# point: w_q rounded to bf16 is off by <= 2^-9 relative; adjacent grid points are
# >= 1/16 apart relative (E4M3 1.875 vs 2), so half a gap is 1/32 > the tolerance.
_DECODE_TOLERANCE = 2.0**-6
_SMALLEST_CODE = {"int4": 1.0, "fp8": 2.0**-9, "mxfp4": 0.5, "nvfp4": 0.5}
_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# megatron linear (suffix in the decoder layer) -> HF projections it becomes, in row order.
_HF_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One linear's weight as the student's fake quantization sees it: codes times scales.

    ``w_q = codes * scale_per_element()`` (up to the rounding of ``w_q`` to the student dtype), with
    blocks of ``block_size`` consecutive elements along the input dimension.
    """

    fmt: WeightFormat
    codes: torch.Tensor
    """float32 ``[out, in]`` values on the format's grid: INT4 integers in [-8, 7], E4M3 values
    (FP8), E2M1 values (MXFP4, NVFP4); the sign of zero is kept."""
    scale: torch.Tensor
    """As stored in the checkpoint. int4: float32 ``[out, in/block]`` (amax/7); fp8: float32 0-dim
    (amax/448); mxfp4: uint8 ``[out, in/32]`` (E8M0, exponent + 127); nvfp4: float8_e4m3fn
    ``[out, in/16]`` (block scale in units of ``scale_2``)."""
    scale_2: torch.Tensor | None
    """nvfp4 only: float32 0-dim global scale (global amax / (6 * 448)); else None."""
    block_size: int | None
    """Elements per block scale along the input dim; None for per-tensor FP8."""

    def scale_per_block(self) -> torch.Tensor:
        """float64 multiplier per block ``[out, in/block]`` (or 0-dim for FP8)."""
        if self.fmt == "mxfp4":
            return torch.exp2(self.scale.to(torch.float64) - 127)
        if self.fmt == "nvfp4":
            return self.scale.to(torch.float64) * self.scale_2.to(torch.float64)
        return self.scale.to(torch.float64)

    def scale_per_element(self) -> torch.Tensor:
        """float64 multiplier of each code, ``[out, in]`` (0-dim for FP8)."""
        scale = self.scale_per_block()
        if self.block_size is None:
            return scale
        return scale.repeat_interleave(self.block_size, dim=-1)

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The same weight restricted to output rows ``index`` (block scales follow their rows)."""
        scale = self.scale[index] if self.block_size is not None else self.scale
        return dataclasses.replace(self, codes=self.codes[index], scale=scale)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_student` wrote and what it corrected."""

    export_dir: Path
    fmt: WeightFormat
    codes_total: int
    """Quantized weight elements written."""
    modelopt_code_mismatches: int
    """Elements whose code (as a value; -0 == +0) ModelOpt's exporter alone would have written
    differently from the student's; all of them were replaced by the student's."""
    modelopt_scale_mismatches: int
    """Block (or tensor) scales ModelOpt's exporter alone would have written differently."""


# ------------------------------------------------------------------ codes the student trained on


def weight_format(module: torch.nn.Module) -> WeightFormat:
    """The exportable weight format of a quantized linear (its enabled weight quantizer).

    Raises:
        NotImplementedError: a format the export does not write: INT8, NF4, MXFP8, per-channel
            FP8, static-block NVFP4, W4A8 (sequential weight quantizers), or AWQ / SmoothQuant
            pre-quant scales on the input.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizer = module.weight_quantizer
    supported = ("export writes INT4 (blockwise), FP8 (per tensor), MXFP4 and NVFP4 weights "
                 "without pre-quant scales")
    if not isinstance(quantizer, TensorQuantizer):
        raise NotImplementedError(f"{supported}; got a {type(quantizer).__name__} weight "
                                  "quantizer (W4A8)")
    input_quantizer = getattr(module, "input_quantizer", None)
    if getattr(input_quantizer, "pre_quant_scale", None) is not None:
        raise NotImplementedError(f"{supported}; this linear has an AWQ/SmoothQuant pre-quant "
                                  "scale")
    num_bits = quantizer.num_bits
    block_sizes = quantizer.block_sizes or {}
    dynamic = block_sizes.get("type") == "dynamic"
    scale_bits = block_sizes.get("scale_bits")  # (e, m) pairs may arrive as lists; NF4 uses an int
    scale_bits = tuple(scale_bits) if isinstance(scale_bits, (list, tuple)) else scale_bits
    found: WeightFormat | None = None
    if (num_bits == 4 and block_sizes.get(-1) and not dynamic and scale_bits is None
            and not quantizer.unsigned):
        found = "int4"
    elif num_bits == (4, 3) and not block_sizes and quantizer.axis is None:
        found = "fp8"
    elif num_bits == (2, 1) and dynamic and scale_bits == (8, 0):
        found = "mxfp4"
    elif num_bits == (2, 1) and dynamic and scale_bits == (4, 3):
        found = "nvfp4"
    if found is None:
        raise NotImplementedError(f"{supported}; got a weight quantizer with num_bits={num_bits}, "
                                  f"block_sizes={quantizer.block_sizes}, axis={quantizer.axis}")
    return found


def _scale(module: torch.nn.Module, fmt: WeightFormat, weight: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored scale (and NVFP4 global scale) from the fake quantization's own arithmetic.

    ``weight`` is the student-dtype weight upcast to float32: the scales of weight-derived
    formats must come from it, not from its bf16 cast (ModelOpt's exporter uses the cast).
    """
    from modelopt.torch.export.quant_utils import get_weight_scaling_factor
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    quantizer = module.weight_quantizer
    if fmt in ("int4", "fp8"):  # from the calibrated amax only: ModelOpt's own function
        scale = get_weight_scaling_factor(module).float()
        return (scale.reshape(()) if fmt == "fp8" else scale.reshape(weight.shape[0], -1)), None
    if fmt == "mxfp4":
        block = quantizer.block_sizes[-1]
        amax = weight.abs().reshape(weight.shape[0], -1, block).amax(dim=-1)
        return (e8m0_scale_exponent(amax, E2M1_MAX) + 127).to(torch.uint8), None
    scale_2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer).float()
    block_scale, _ = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(
        quantizer, weight, scale_2)
    return block_scale, scale_2.reshape(())


def _to_grid(ratio: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Nearest grid point of the format (sign kept)."""
    if fmt == "int4":
        return ratio.round().clamp(-8, 7)
    if fmt == "fp8":
        return round_to_e4m3(ratio)
    return round_to_e2m1(ratio)


def student_weight_codes(module: torch.nn.Module) -> QuantizedWeight:
    """The codes and scales behind ``module.weight_quantizer(module.weight)``.

    Args:
        module: a quantized linear (ModelOpt ``Quant*ParallelLinear``) with an enabled weight
            quantizer of an exportable format (:func:`weight_format`).

    Returns:
        Its :class:`QuantizedWeight`: ``codes * scale_per_element()`` is the fake-quantized
        weight up to its rounding to the weight dtype.

    Raises:
        RuntimeError: the fake-quantized weight does not decode onto the format's grid with these
            scales (a fake-quant kernel whose arithmetic differs from the one assumed here).
    """
    quantizer = module.weight_quantizer
    fmt = weight_format(module)
    with torch.no_grad():
        weight = module.weight.detach()
        fake_quantized = quantizer(weight).to(torch.float64)
        scale, scale_2 = _scale(module, fmt, weight.float())
    block = None if fmt == "fp8" else quantizer.block_sizes[-1]
    partial = QuantizedWeight(fmt, torch.empty(0), scale, scale_2, block)
    per_element = partial.scale_per_element()
    if fmt == "nvfp4":
        # The NVFP4 kernel uses scale 1.0 for blocks whose decoded scale is below 1e-5. Their
        # elements come out 0 (which any stored scale decodes) unless the global amax is above
        # ~1e5; a nonzero one would need a scale the checkpoint cannot hold.
        tiny = per_element < 1e-5
        if (fake_quantized[tiny] != 0).any():
            raise RuntimeError("NVFP4 blocks with a decoded scale below 1e-5 hold nonzero "
                               "weights (global amax above ~1e5); the checkpoint cannot hold "
                               "the kernel's substitute scale 1.0")
        per_element = torch.where(tiny, 1.0, per_element)
    ratio = (fake_quantized / per_element).float()
    codes = _to_grid(ratio, fmt)
    off_grid = (ratio - codes).abs() > _DECODE_TOLERANCE * codes.abs().clamp(
        min=_SMALLEST_CODE[fmt])
    if off_grid.any():
        raise RuntimeError(
            f"{int(off_grid.sum())} of {codes.numel()} fake-quantized {fmt} weight elements do "
            f"not decode onto the {fmt} grid with the scales computed for export (worst ratio "
            f"{ratio[off_grid][0].item()!r}); the fake-quant kernel's arithmetic differs from "
            "the one nemo_opd.quant.export assumes"
        )
    # The exporter writes from CPU tensors; the check above ran wherever the weight lives.
    return dataclasses.replace(partial, codes=codes.cpu(), scale=scale.cpu(),
                               scale_2=None if scale_2 is None else scale_2.cpu())


# ------------------------------------------------------------------ packing (ModelOpt's layouts)


def _fp4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 values -> 4-bit codes (sign bit 3, magnitude index in bits 0-2), uint8."""
    magnitude = torch.searchsorted(_E2M1_GRID, codes.abs().contiguous()).to(torch.uint8)
    return (torch.signbit(codes).to(torch.uint8) << 3) | magnitude


def _pack(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one HF projection, in the layouts ModelOpt's exporter writes.

    INT4: two rows per byte (row 2i in the low nibble), two's complement; MXFP4/NVFP4: two
    input-dim neighbours per byte (even index in the low nibble); FP8: float8_e4m3fn.
    """
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    if weight.fmt == "int4":  # ModelOpt's own packer; unit scales leave the integer codes as is
        packed = pack_int4_in_uint8(weight.codes, torch.ones_like(weight.scale), weight.block_size)
    elif weight.fmt == "fp8":
        packed = weight.codes.to(torch.float8_e4m3fn)
    else:
        nibbles = _fp4_nibbles(weight.codes)
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    tensors = {"weight": packed, "weight_scale": weight.scale.clone()}
    if weight.scale_2 is not None:
        tensors["weight_scale_2"] = weight.scale_2.clone()
    return tensors


def _unpack_codes(fmt: WeightFormat, packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack` for the weight: float32 code values ``[out, in]``."""
    if fmt == "fp8":
        return packed.to(torch.float32)
    low, high = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
    if fmt == "int4":
        rows = torch.stack([low, high], dim=1).reshape(-1, packed.shape[-1])
        return torch.where(rows > 7, rows - 16, rows).to(torch.float32)
    nibbles = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    values = _E2M1_GRID[(nibbles & 0x7).long()]
    return torch.where(nibbles >= 8, -values, values)


# ------------------------------------------------------------------ megatron -> HF projections


def _hf_row_splits(suffix: str, module: torch.nn.Module) -> list[torch.Tensor]:
    """Output-row indices of ``module``'s weight for each HF projection of ``_HF_PROJECTIONS``."""
    config = module.config
    rows = module.weight.shape[0]
    if suffix == "self_attention.linear_qkv":
        # megatron interleaves per query group: [q (heads/group x head_dim), k, v] x groups
        heads_per_group = config.num_attention_heads // config.num_query_groups
        grouped = torch.arange(rows).reshape(config.num_query_groups, heads_per_group + 2,
                                             config.kv_channels)
        return [grouped[:, :heads_per_group].reshape(-1), grouped[:, heads_per_group].reshape(-1),
                grouped[:, heads_per_group + 1].reshape(-1)]
    if suffix == "mlp.linear_fc1":  # [gate; up]
        return [torch.arange(config.ffn_hidden_size),
                torch.arange(config.ffn_hidden_size, 2 * config.ffn_hidden_size)]
    return [torch.arange(rows)]


def _student_hf_tensors(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """HF projection prefix (``model.layers.0.self_attn.q_proj``) -> its student codes."""
    from nemo_opd.quant.student import enabled_quantizers

    out: dict[str, QuantizedWeight] = {}
    quantized = {name.rsplit(".", 1)[0] for name in enabled_quantizers(model)["weight"]}
    for name in sorted(quantized):
        index, _, suffix = name.removeprefix("decoder.layers.").partition(".")
        module = model.get_submodule(name)
        codes = student_weight_codes(module)
        # decoder.layers.<i> is the local index; at PP = 1 it is the global (HF) one.
        for projection, rows in zip(_HF_PROJECTIONS[suffix], _hf_row_splits(suffix, module),
                                    strict=True):
            out[f"model.layers.{index}.{projection}"] = codes.rows(rows)
    return out


def _replace_quantized_tensors(layer_state_dicts: dict[int, dict[str, torch.Tensor]],
                               student: dict[str, QuantizedWeight]) -> tuple[int, int, int]:
    """Overwrite ModelOpt's weight/scale tensors with the student's; return counts.

    Returns ``(codes_total, modelopt_code_mismatches, modelopt_scale_mismatches)``. Every tensor
    we write must have the shape and dtype ModelOpt chose for it (same layout, same loader).
    """
    where = {key: state for state in layer_state_dicts.values() for key in state}
    total = code_mismatches = scale_mismatches = 0
    for prefix, weight in student.items():
        for name, tensor in _pack(weight).items():
            key = f"{prefix}.{name}"
            if key not in where:
                raise KeyError(f"ModelOpt's exporter wrote no {key}; the model's layout is not "
                               "the Llama/Qwen layout this export covers")
            theirs = where[key][key]
            if theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
                raise ValueError(f"{key}: ModelOpt wrote {tuple(theirs.shape)} {theirs.dtype}, "
                                 f"we computed {tuple(tensor.shape)} {tensor.dtype}")
            if name == "weight":
                total += weight.codes.numel()
                code_mismatches += int((_unpack_codes(weight.fmt, theirs) != weight.codes).sum())
            elif name == "weight_scale":
                scale_mismatches += int((theirs.float() != tensor.float()).sum())
            where[key][key] = tensor
    return total, code_mismatches, scale_mismatches


def _write_quant_config(exporter: Any, export_dir: Path, fmt: WeightFormat,
                        block_size: int | None) -> None:
    """``hf_quant_config.json`` for INT4 and MXFP4, which ModelOpt's megatron exporter skips.

    ``GPTModelExporter.save_pretrained`` writes it (and ``config.json``'s
    ``quantization_config``) only for FP8 and NVFP4. For INT4 we use the name ModelOpt's HF
    exporter gives blockwise INT4 (``W4A16_AWQ``; ``pre_quant_scale`` false: the student has
    none, so none is exported); for MXFP4 weights TensorRT-LLM's ``QuantAlgo.W4A16_MXFP4``
    (ModelOpt has no name for dense MXFP4 weights). ``config.json`` gets the same fields as
    ``quantization_config`` (ModelOpt's ``convert_hf_quant_config_format`` knows only FP8/NVFP4).
    """
    from modelopt import __version__

    if fmt not in ("int4", "mxfp4"):
        return
    quantization: dict[str, Any] = (
        {"quant_algo": "W4A16_AWQ", "group_size": block_size, "has_zero_point": False,
         "pre_quant_scale": False} if fmt == "int4"
        else {"quant_algo": "W4A16_MXFP4", "group_size": block_size})
    quantization["exclude_modules"] = sorted(exporter.exclude_modules)
    quantization["kv_cache_quant_algo"] = None
    producer = {"name": "modelopt", "version": __version__}
    (export_dir / "hf_quant_config.json").write_text(
        json.dumps({"producer": producer, "quantization": quantization}, indent=4))
    config_path = export_dir / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["quantization_config"] = {**quantization, "quant_method": "modelopt",
                                        "producer": producer}
    config_path.write_text(json.dumps(hf_config, indent=4))


def _make_readable(export_dir: Path) -> None:
    """Files 0644, directories 0755 under ``export_dir`` (itself included).

    safetensors' ``save_file`` (0.8 here) creates its files with mode 0600 whatever the umask,
    so the weights ModelOpt's exporter saves would be unreadable to a serving process or a
    colleague running as another user, while the JSON files beside them are 0644 (umask 022).
    The export is a deliverable: every file gets the ordinary mode.
    """
    export_dir.chmod(0o755)
    for path in export_dir.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _check_whole(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    tp = getattr(config, "tensor_model_parallel_size", 1)
    pp = getattr(config, "pipeline_model_parallel_size", 1)
    if tp != 1 or pp != 1:
        raise ValueError(
            f"export needs the whole model in one process (TP = PP = 1); got TP={tp}, "
            f"PP={pp}. Save it with nemo_opd.models.checkpoint.save_model_checkpoint and restore "
            "it at TP=1 with load_model_checkpoint first (ModelOpt's exporter writes every TP "
            "rank's shard to the same file)."
        )


def _check_exportable(model: torch.nn.Module) -> WeightFormat:
    from nemo_opd.quant.student import enabled_quantizers

    _check_whole(model)
    names = enabled_quantizers(model)["weight"]
    if not names:
        raise ValueError(
            "export_student exports a quantized student, but the model has no enabled weight "
            "quantizer; quantize it with nemo_opd.quant.student.quantize_student first, or "
            "write it unquantized with export_full_precision"
        )
    linears = [name.rsplit(".", 1)[0] for name in names]
    for linear in linears:
        prefix, _, rest = linear.partition(".layers.")
        if prefix != "decoder" or rest.partition(".")[2] not in _HF_PROJECTIONS:
            raise NotImplementedError(f"export covers quantized decoder linears "
                                      f"{sorted(_HF_PROJECTIONS)}; {linear} is quantized too")
    formats = Counter(weight_format(model.get_submodule(linear)) for linear in linears)
    if len(formats) != 1:
        raise NotImplementedError(f"mixed weight formats {dict(formats)} are not exported")
    return next(iter(formats))


def export_student(model: torch.nn.Module, hf_model_dir: str | Path, export_dir: str | Path, *,
                   dtype: torch.dtype = torch.bfloat16,
                   tokenizer_dir: str | Path | None = None) -> ExportResult:
    """Write ``model`` as a ModelOpt unified HF checkpoint whose codes equal the trained ones.

    Unmerged LoRA adapters are merged first (in place, :func:`nemo_opd.quant.lora.merge_lora`:
    merge, then re-quantize with the same quantizers).

    Args:
        model: a quantized megatron-core ``GPTModel`` (:func:`~nemo_opd.quant.quantize_student`),
            TP = PP = 1, any parameter dtype.
        hf_model_dir: the HF directory the student was imported from (config, generation config).
        export_dir: output directory (created; its files end 0644, directories 0755).
        dtype: dtype of the unquantized tensors (embeddings, norms, output layer).
        tokenizer_dir: copy the tokenizer files (:data:`TOKENIZER_FILES`) from here; ModelOpt
            already copies those in ``hf_model_dir``.

    Returns:
        :class:`ExportResult` with the number of codes written and how many ModelOpt alone would
        have written differently.

    Raises:
        ValueError: TP/PP > 1, or no enabled weight quantizer (an unquantized model).
        NotImplementedError: a weight format or quantized module the export does not cover.
        RuntimeError: the student's fake-quantized weights do not decode onto the format's grid.
    """
    from nemo_opd.quant.lora import has_lora_adapters, merge_lora

    hf_model_dir, export_dir = _check_export_paths(hf_model_dir, export_dir, dtype,
                                                   tokenizer_dir)
    fmt = _check_exportable(model)
    if has_lora_adapters(model):
        logger.warning("export_student: merging LoRA adapters into the base weights (in place)")
        merge_lora(model)
    student = _student_hf_tensors(model)

    exporter = modelopt_exporter_class()(model, str(hf_model_dir), dtype=dtype)
    total, code_mismatches, scale_mismatches = _replace_quantized_tensors(
        exporter.layer_state_dicts, student)
    _save_export(exporter, hf_model_dir, export_dir, tokenizer_dir)
    if is_rank0():
        block_size = next(iter(student.values())).block_size
        _write_quant_config(exporter, export_dir, fmt, block_size)
    _make_readable(export_dir)
    logger.info("exported %s student to %s: %d codes; ModelOpt alone would have written %d "
                "codes and %d scales differently", fmt, export_dir, total, code_mismatches,
                scale_mismatches)
    return ExportResult(export_dir, fmt, total, code_mismatches, scale_mismatches)


def export_full_precision(model: torch.nn.Module, hf_model_dir: str | Path,
                          export_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                          tokenizer_dir: str | Path | None = None) -> Path:
    """Write an unquantized ``model`` (a size- or self-distilled student, ``quant.format=none``)
    as a plain Hugging Face checkpoint of ``dtype``: ModelOpt's ``GPTModelExporter`` as it is
    (what ``export_mcore_gpt_to_hf`` does), the padded vocabulary rows trimmed, the tokenizer
    copied. It loads with ``AutoModelForCausalLM`` and as the ``model.student`` of a next run.
    Same arguments, checks and layout rules as :func:`export_student`; returns ``export_dir``.

    Raises:
        ValueError: TP/PP > 1, or a quantized model (:func:`export_student` writes those).
    """
    from nemo_opd.quant.student import enabled_quantizers

    hf_model_dir, export_dir = _check_export_paths(hf_model_dir, export_dir, dtype,
                                                   tokenizer_dir)
    _check_whole(model)
    if any(enabled_quantizers(model).values()):
        raise ValueError("export_full_precision writes an unquantized model, but this one has "
                         "enabled quantizers; export_student writes quantized checkpoints")
    exporter = modelopt_exporter_class()(model, str(hf_model_dir), dtype=dtype)
    _save_export(exporter, hf_model_dir, export_dir, tokenizer_dir)
    _make_readable(export_dir)
    logger.info("exported the full-precision student to %s (%s)", export_dir, dtype)
    return export_dir


def _check_export_paths(hf_model_dir: str | Path, export_dir: str | Path, dtype: torch.dtype,
                        tokenizer_dir: str | Path | None) -> tuple[Path, Path]:
    hf_model_dir, export_dir = Path(hf_model_dir), Path(export_dir)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if not (hf_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_model_dir} has no config.json (the student's HF source)")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} does not exist")
    return hf_model_dir, export_dir


def _save_export(exporter: Any, hf_model_dir: Path, export_dir: Path,
                 tokenizer_dir: str | Path | None) -> None:
    """Trim the vocabulary padding from ``exporter``'s tensors, write them and the configs to
    ``export_dir`` and copy the tokenizer files from ``tokenizer_dir``."""
    from nemo_opd.models.hf_config import read_hf_config
    from nemo_opd.models.vocab import trim_padded_vocab

    hf_config = read_hf_config(hf_model_dir)
    trim_padded_vocab(exporter.layer_state_dicts, hf_config.architecture, hf_config.vocab_size)
    export_dir.mkdir(parents=True, exist_ok=True)
    exporter.save_pretrained(str(export_dir), str(hf_model_dir))
    if is_rank0() and tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, export_dir / name)
