"""Student and teacher GPTModels: from HF checkpoint directories or tiny local configs.

``models.hf_config`` and ``models.architectures`` are plain Python (the memory planner and
``--help`` read them without megatron-core); the names that build models are imported from
``models.hf_import`` on first use.
"""

import importlib
from typing import Any

from nemo_opd.models.architectures import ARCHITECTURES, ArchitectureTraits

__all__ = [
    "ARCHITECTURES",
    "ArchitectureTraits",
    "HFModelConfig",
    "RecomputeConfig",
    "check_parallel_features",
    "build_gpt_model",
    "check_parallel_fits",
    "load_hf_gpt",
    "read_hf_config",
    "transformer_config",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("nemo_opd.models.hf_import"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
