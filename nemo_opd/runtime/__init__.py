"""Process groups, megatron-core parallel state, devices, and the CPU backend for megatron-core."""

from nemo_opd.runtime.distributed import (
    ParallelConfig,
    RuntimeInfo,
    distributed_runtime,
    initialize_runtime,
    is_rank0,
    model_parallel_layout,
    model_process_groups,
    runtime_device,
    seed_all,
    teardown_runtime,
)

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
