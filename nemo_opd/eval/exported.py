"""Evaluate the deployable artifact: a ModelOpt unified HF checkpoint (``hf_quant_config.json``).

Two ways, each labelled with its numerics in the results:

* **HF dequantised** — :func:`dequantize_export` turns the packed weights back into a plain HF
  model directory (``weight = codes × scales``, AWQ pre-quant scales folded into the weight's
  input columns), which lm-eval's own ``HFLM`` (:func:`hf_lm`) or our megatron path then
  evaluates. This measures exactly the exported weight codes, on any machine; activations
  run unquantized (an FP8 / W4A8 export's activation quantization is TensorRT-LLM's to apply).
* **TRT-LLM** — :func:`trtllm_lm` serves the export unchanged with TensorRT-LLM through lm-eval's
  ``trtllm`` model (NGC containers; raises :class:`BackendUnavailable` elsewhere).

:func:`checkpoint_dtype` says which dtype a checkpoint's weights are stored in (the default
dtype of ``nemo_opd eval`` and of ``--model nemo_opd``); :func:`plain_checkpoint` gives the HF
directory to load, the export's dequantised copy when there is one.

Dequantisers are looked up by the checkpoint's ``quant_algo`` in :data:`DEQUANTIZERS`; another
format plugs in with :func:`register_dequantizer`. Built in: FP8 (per tensor / per channel),
INT8 weight-only and SmoothQuant, INT4 blockwise (``INT4_AWQ``, ``W4A16_AWQ``, ``W4A8_AWQ``:
ModelOpt's two-rows-per-byte packing), NVFP4 and MXFP4 (two input neighbours per byte), i.e.
every format :func:`nemo_opd.quant.export.export_student` writes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nemo_opd.console import is_verbose

__all__ = [
    "BackendUnavailable",
    "DEQUANTIZERS",
    "DTYPES",
    "Dequantizer",
    "checkpoint_dtype",
    "dequantize_export",
    "dequantize_tensors",
    "hf_lm",
    "plain_checkpoint",
    "read_quant_config",
    "register_dequantizer",
    "trtllm_lm",
]

logger = logging.getLogger(__name__)

QUANT_CONFIG_FILE = "hf_quant_config.json"

Dequantizer = Callable[[dict[str, torch.Tensor], str, dict[str, Any]], torch.Tensor]
"""``fn(tensors, prefix, quant) -> float32 weight``: ``tensors`` holds ``<prefix>.weight`` and its
scales (``<prefix>.weight_scale``...); ``quant`` is the ``quantization`` section of the config."""

DEQUANTIZERS: dict[str, Dequantizer] = {}
"""``quant_algo`` (upper case, as ModelOpt writes it) → dequantiser."""

DTYPES = ("float32", "bfloat16", "float16")
"""Weight dtypes the megatron and HF evaluation backends accept, by torch name."""

# safetensors header spellings of DTYPES
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

# Tensors that only serve the quantized kernels; a dequantised model has no use for them.
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale",
                   ".k_scale", ".v_scale", ".output_scale")


class BackendUnavailable(RuntimeError):
    """The requested inference backend is not installed on this machine."""


def register_dequantizer(*algos: str) -> Callable[[Dequantizer], Dequantizer]:
    """Decorator registering ``fn`` for each ``quant_algo`` in ``algos``."""
    def register(fn: Dequantizer) -> Dequantizer:
        for algo in algos:
            DEQUANTIZERS[algo.upper()] = fn
        return fn
    return register


@register_dequantizer("FP8")
def _fp8(tensors: dict[str, torch.Tensor], prefix: str, quant: dict[str, Any]) -> torch.Tensor:
    weight, scale = tensors[f"{prefix}.weight"].float(), tensors[f"{prefix}.weight_scale"].float()
    return weight * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)


@register_dequantizer("INT8_WO", "INT8_SQ")
def _int8(tensors: dict[str, torch.Tensor], prefix: str, quant: dict[str, Any]) -> torch.Tensor:
    scale = tensors[f"{prefix}.weight_scale"].float()
    weight = tensors[f"{prefix}.weight"].float() * scale[:, None]
    return _fold_pre_quant_scale(weight, tensors, prefix)


@register_dequantizer("INT4_AWQ", "W4A16_AWQ", "W4A8_AWQ")
def _int4_blockwise(tensors: dict[str, torch.Tensor], prefix: str,
                    quant: dict[str, Any]) -> torch.Tensor:
    """ModelOpt's ``pack_int4_in_uint8``: byte ``[i, j]`` holds rows ``2i`` (low nibble) and
    ``2i + 1`` (high nibble) of column ``j``, two's complement; ``weight_scale [out, in/block]``."""
    packed = tensors[f"{prefix}.weight"].view(torch.uint8).to(torch.int16)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1)  # [out/2, 2, in]
    codes = torch.where(nibbles > 7, nibbles - 16, nibbles).reshape(-1, packed.shape[-1])
    scale = tensors[f"{prefix}.weight_scale"].float()
    block = codes.shape[-1] // scale.shape[-1]
    weight = codes.float() * scale.repeat_interleave(block, dim=-1)
    return _fold_pre_quant_scale(weight, tensors, prefix)


_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``[out, in]`` from bytes holding input-dim neighbours ``2j`` (low nibble) and
    ``2j + 1`` (high nibble); bit 3 of a nibble is the sign, bits 0-2 index the magnitude."""
    packed = packed.view(torch.uint8)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    values = torch.tensor(_E2M1_VALUES)[(nibbles & 0x7).long()]
    return torch.where(nibbles >= 8, -values, values)


def _blockwise(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes * scale.repeat_interleave(codes.shape[-1] // scale.shape[-1], dim=-1)


@register_dequantizer("NVFP4", "W4A16_NVFP4")
def _nvfp4(tensors: dict[str, torch.Tensor], prefix: str, quant: dict[str, Any]) -> torch.Tensor:
    """E2M1 codes × E4M3 block scale (16 elements) × float32 global ``weight_scale_2``."""
    scale = (tensors[f"{prefix}.weight_scale"].float()
             * tensors[f"{prefix}.weight_scale_2"].float())
    return _blockwise(_fp4_codes(tensors[f"{prefix}.weight"]), scale)


@register_dequantizer("MXFP4", "W4A16_MXFP4")
def _mxfp4(tensors: dict[str, torch.Tensor], prefix: str, quant: dict[str, Any]) -> torch.Tensor:
    """E2M1 codes × ``2^(e − 127)`` per 32-element block (E8M0 exponents stored as uint8)."""
    exponent = tensors[f"{prefix}.weight_scale"].view(torch.uint8).float()
    return _blockwise(_fp4_codes(tensors[f"{prefix}.weight"]), torch.exp2(exponent - 127))


def _fold_pre_quant_scale(weight: torch.Tensor, tensors: dict[str, torch.Tensor],
                          prefix: str) -> torch.Tensor:
    # AWQ / SmoothQuant scale activations by s before the GEMM: W (x ∘ s) = (W diag s) x.
    pre = tensors.get(f"{prefix}.pre_quant_scale")
    return weight if pre is None else weight * pre.float()[None, :]


def read_quant_config(export_dir: str | Path) -> dict[str, Any] | None:
    """The ``quantization`` section of ``hf_quant_config.json``, or None for a plain HF dir."""
    path = Path(export_dir) / QUANT_CONFIG_FILE
    if not path.is_file():
        return None
    quant = json.loads(path.read_text()).get("quantization")
    if not isinstance(quant, dict) or "quant_algo" not in quant:
        raise ValueError(f"{path}: expected a 'quantization' section with 'quant_algo'")
    return quant


def dequantize_tensors(tensors: dict[str, torch.Tensor], quant: dict[str, Any], *,
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A plain state dict in ``dtype``: every ``<prefix>.weight`` with a ``weight_scale`` is
    dequantised by the ``quant_algo``'s dequantiser, scale tensors are dropped, the rest cast."""
    algo = str(quant["quant_algo"]).upper()
    quantized = [name.removesuffix(".weight_scale") for name in tensors
                 if name.endswith(".weight_scale")]
    if quantized and algo not in DEQUANTIZERS:
        raise ValueError(f"no dequantiser for quant_algo {algo!r} (registered: "
                         f"{sorted(DEQUANTIZERS)}); add one with register_dequantizer")
    out = {name: (value.to(dtype) if value.is_floating_point() else value)
           for name, value in tensors.items() if not name.endswith(_SCALE_SUFFIXES)}
    for prefix in quantized:
        out[f"{prefix}.weight"] = DEQUANTIZERS[algo](tensors, prefix, quant).to(dtype)
    return out


def dequantize_export(export_dir: str | Path, out_dir: str | Path, *,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out_dir``: a plain HF model directory with the export's weights dequantised.

    Config and tokenizer files are copied (``quantization_config`` dropped from
    ``config.json``). Returns ``out_dir``. A directory without ``hf_quant_config.json`` is not
    a quantized export and is refused (``ValueError``): labelled "dequantised", its scores
    would claim numerics it does not have.
    """
    from safetensors.torch import load_file, save_file

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if not (export_dir / "config.json").is_file():
        raise FileNotFoundError(f"{export_dir} has no config.json; expected a ModelOpt unified "
                                "HF checkpoint (export_hf_checkpoint / export_mcore_gpt_to_hf)")
    shards = sorted(export_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{export_dir} holds no *.safetensors weights")
    quant = read_quant_config(export_dir)
    if quant is None:
        raise ValueError(f"{export_dir} is not a quantized export (no {QUANT_CONFIG_FILE}); "
                         "evaluate it as a plain Hugging Face model (without --export)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in export_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in (
                QUANT_CONFIG_FILE, "model.safetensors.index.json"):
            shutil.copy2(item, out_dir / item.name)
    config = json.loads((export_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(shard))
    save_file(dequantize_tensors(tensors, quant, dtype=dtype), out_dir / "model.safetensors",
              metadata={"format": "pt"})
    logger.debug("dequantised %s (%s) to %s (%s)", export_dir, quant["quant_algo"], out_dir, dtype)
    return out_dir


def _stored_dtype(model_dir: Path) -> str | None:
    """The dtype holding most elements among the unquantized floating-point tensors of
    ``model_dir/*.safetensors`` (read from the file headers; no tensor is loaded), or None."""
    elements: collections.Counter[str] = collections.Counter()
    for shard in sorted(model_dir.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        quantized = {name.removesuffix(".weight_scale") + ".weight" for name in header
                     if name.endswith(".weight_scale")}
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype and name not in quantized and not name.endswith(_SCALE_SUFFIXES):
                count = 1
                for size in info["shape"]:
                    count *= size
                elements[dtype] += count
    return elements.most_common(1)[0][0] if elements else None


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype (``"float32"``, ``"bfloat16"`` or ``"float16"``) a checkpoint's weights are
    stored in: what ``nemo_opd eval`` and ``--model nemo_opd`` load it in unless told otherwise.

    A ModelOpt export (``hf_quant_config.json``): the dtype of its unquantized tensors
    (embeddings, norms, output layer), from the safetensors headers; its ``config.json`` keeps
    the source model's dtype, which the export may have changed. A plain HF directory:
    ``config.json``'s ``dtype`` (transformers >= 4.56) or ``torch_dtype``, else the headers.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: no dtype can be read, or it is none of :data:`DTYPES`.
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json (expected a Hugging Face model "
                                "directory or a ModelOpt unified export)")
    config = json.loads(config_file.read_text())
    named = None if (model_dir / QUANT_CONFIG_FILE).is_file() else (
        config.get("dtype") or config.get("torch_dtype"))
    dtype = named if named not in (None, "auto") else _stored_dtype(model_dir)
    if dtype is None:
        raise ValueError(f"cannot tell the dtype of {model_dir}: its config.json names none and "
                         "it has no *.safetensors weights; pass the dtype (--dtype / dtype=)")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"{model_dir} stores {dtype} weights; evaluation runs in one of "
                         f"{', '.join(DTYPES)}: pass one (--dtype / dtype=)")
    return dtype


@contextlib.contextmanager
def plain_checkpoint(model_dir: str | Path, *, export: bool = False,
                     dtype: str | None = None) -> Iterator[tuple[Path, str]]:
    """``(HF directory to load, dtype name)`` for the block.

    ``export=False``: ``model_dir`` itself. ``export=True``: ``model_dir`` is a ModelOpt unified
    checkpoint, dequantised (:func:`dequantize_export`) into a temporary directory removed when
    the block ends. ``dtype`` None means :func:`checkpoint_dtype` of ``model_dir``.
    """
    dtype = dtype or checkpoint_dtype(model_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not export:
        yield Path(model_dir), dtype
        return
    with tempfile.TemporaryDirectory(prefix="nemo_opd_") as scratch:
        yield dequantize_export(model_dir, Path(scratch) / "dequantised",
                                dtype=getattr(torch, dtype)), dtype


def hf_lm(model_dir: str | Path, *, dtype: str | None = None, batch_size: int = 8,
          max_length: int | None = None, numerics: str | None = None):
    """lm-eval's ``hf`` model on a plain HF directory, built as its command line builds it
    (``lm_eval --model hf --model_args pretrained=DIR,dtype=DTYPE[,max_length=N]
    --batch_size B --device cuda|cpu``), with a ``numerics`` label (default ``"HF <dtype>"``,
    e.g. ``"HF bf16"``). ``dtype`` None: :func:`checkpoint_dtype`."""
    from lm_eval.api.registry import get_model

    from nemo_opd.eval.lm import dtype_label

    dtype = dtype or checkpoint_dtype(model_dir)
    model_args = {"pretrained": str(model_dir), "dtype": dtype}
    if max_length is not None:
        model_args["max_length"] = max_length
    lm = get_model("hf").create_from_arg_obj(model_args, {
        "batch_size": batch_size, "device": "cuda" if torch.cuda.is_available() else "cpu"})
    lm.numerics = numerics or f"HF {dtype_label(dtype)}"
    if not is_verbose():  # lm-eval's per-request bars: third-party bars (nemo_opd.console)
        for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, method, functools.partial(getattr(lm, method), disable_tqdm=True))
    return lm


def trtllm_lm(export_dir: str | Path, *, tensor_parallel_size: int = 1, **kwargs: Any):
    """lm-eval's TensorRT-LLM model serving the export as is (``numerics = "TRT-LLM"``).

    Raises:
        BackendUnavailable: ``tensorrt_llm`` is not importable (it ships in NGC containers and
            has no wheel for CPU machines).
    """
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None:
        raise BackendUnavailable("TensorRT-LLM is not installed here (it ships in the NGC "
                                 "TensorRT-LLM container); evaluate the export with --backend hf "
                                 "(dequantised) instead, or run inside the container")
    from lm_eval.models.trtllm_causallms import TRTLLM

    lm = TRTLLM(model=str(export_dir), tensor_parallel_size=tensor_parallel_size, **kwargs)
    lm.numerics = "TRT-LLM"
    return lm
