"""Process groups, megatron-core parallel state, devices, and the CPU backend for megatron-core.

:class:`ParallelConfig` (``runtime.layout``) is plain data; everything else lives in
``runtime.distributed`` and is imported on first use, so configs and ``--help`` texts load
without megatron-core.
"""

import importlib
from typing import Any

from nemo_opd.runtime.layout import ParallelConfig
from nemo_opd.runtime.rank import is_rank0

__all__ = [
    "ParallelConfig",
    "RuntimeInfo",
    "distributed_runtime",
    "initialize_runtime",
    "is_rank0",
    "model_process_groups",
    "runtime_device",
    "seed_all",
    "teardown_runtime",
    "model_parallel_layout",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("nemo_opd.runtime.distributed"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
