"""Quantization: ModelOpt formats, and the CPU fake-quant path for MX and NVFP4.

:mod:`nemo_opd.quant.cpu_backend` registers the ``"nemo_opd_cpu"`` ModelOpt quant backend when it
is imported (any of the names below from it imports it); :func:`enable_cpu_quant_backend` routes
a ModelOpt config's MXFP4 / MXFP8 / NVFP4 quantizers through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_opd.quant.cpu_backend import (
        BACKEND_NAME,
        cpu_fake_quant,
        dynamic_block_format,
        enable_cpu_quant_backend,
        register_cpu_quant_backend,
    )
    from nemo_opd.quant.export import (
        ExportResult,
        export_full_precision,
        export_student,
        student_weight_codes,
    )
    from nemo_opd.quant.lora import (
        LoraConfig,
        add_lora,
        has_lora_adapters,
        lora_parameters,
        merge_lora,
    )
    from nemo_opd.quant.mx_numerics import mx_fake_quant, nvfp4_fake_quant

# Resolved on first use: cpu_backend imports ModelOpt (seconds), which light modules of this
# package (e.g. formats) must not pay for.
_EXPORTS = {
    "BACKEND_NAME": "cpu_backend",
    "cpu_fake_quant": "cpu_backend",
    "dynamic_block_format": "cpu_backend",
    "enable_cpu_quant_backend": "cpu_backend",
    "register_cpu_quant_backend": "cpu_backend",
    "mx_fake_quant": "mx_numerics",
    "nvfp4_fake_quant": "mx_numerics",
    "ExportResult": "export",
    "export_student": "export",
    "export_full_precision": "export",
    "student_weight_codes": "export",
    "LoraConfig": "lora",
    "add_lora": "lora",
    "has_lora_adapters": "lora",
    "lora_parameters": "lora",
    "merge_lora": "lora",
}

__all__ = [
    "BACKEND_NAME",
    "cpu_fake_quant",
    "dynamic_block_format",
    "enable_cpu_quant_backend",
    "mx_fake_quant",
    "nvfp4_fake_quant",
    "register_cpu_quant_backend",
    "ExportResult",
    "export_student",
    "export_full_precision",
    "student_weight_codes",
    "LoraConfig",
    "add_lora",
    "has_lora_adapters",
    "lora_parameters",
    "merge_lora",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
