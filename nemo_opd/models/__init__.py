"""Student and teacher GPTModels: from HF checkpoint directories or tiny local configs."""

from nemo_opd.models.architectures import ARCHITECTURES, ArchitectureTraits
from nemo_opd.models.hf_import import (
    HFModelConfig,
    RecomputeConfig,
    build_gpt_model,
    check_parallel_features,
    check_parallel_fits,
    load_hf_gpt,
    read_hf_config,
    transformer_config,
)

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
