"""Process groups and megatron-core parallel state for one nemo_opd process.

One entry point, :func:`initialize_runtime`, brings up ``torch.distributed`` (NCCL with CUDA,
gloo without) from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) or as a single process when those are absent, applies the CPU
backend when there is no CUDA, initialises megatron-core's parallel state for the *student's*
layout and seeds every generator. :func:`teardown_runtime` undoes all of it.

A second model with another tensor-parallel size in the same job (a teacher at TP=1 next to a
TP=2 student, say) gets its own :class:`~megatron.core.process_groups_config.ProcessGroupCollection`
from :func:`model_process_groups`; megatron-core's modules take it as ``pg_collection``. Code
that reads megatron's *global* TP rank (ModelOpt's HF importer) runs inside
:func:`model_parallel_layout`.
"""


import contextlib
import dataclasses
import logging
import os
import random
import socket
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from nemo_opd.runtime import cpu_backend
from nemo_opd.runtime.layout import ParallelConfig
from nemo_opd.runtime.rank import is_rank0

__all__ = [
    "ParallelConfig",
    "RuntimeInfo",
    "initialize_runtime",
    "teardown_runtime",
    "distributed_runtime",
    "seed_all",
    "runtime_device",
    "is_rank0",
    "model_process_groups",
    "model_parallel_layout",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """What :func:`initialize_runtime` set up."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    parallel: ParallelConfig
    data_parallel_size: int
    owns_process_group: bool
    """True when this runtime created the default process group (and so destroys it)."""


_RUNTIME: RuntimeInfo | None = None


def runtime_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(backend: str, timeout: timedelta) -> None:
    if "RANK" not in os.environ:
        # A plain `python script.py`: a world of one, so the same code path as torchrun. Not
        # through os.environ: a launcher this process starts later (a torchrun of the recipe)
        # would inherit RANK/MASTER_PORT and collide with this store's port.
        dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}")
        return
    dist.init_process_group(backend=backend, timeout=timeout)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's tracked RNG states.

    The default torch generator gets the same seed on every rank, so weights built with
    ``use_cpu_initialization=True`` (the full master weight is drawn, then sliced) are the same
    model at any TP size. megatron's tracker adds its per-TP-rank stream for dropout.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        cpu_backend.install_cpu_rng_tracker()
    model_parallel_cuda_manual_seed(seed)


def initialize_runtime(
    parallel: ParallelConfig | None = None,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 10,
) -> RuntimeInfo:
    """Initialise torch.distributed, megatron-core parallel state and RNGs for this process.

    Args:
        parallel: the student's layout; defaults to TP=1, PP=1 (all ranks data parallel).
        seed: seed for every generator (see :func:`seed_all`).
        backend: ``"nccl"`` or ``"gloo"``; defaults to NCCL when CUDA is available, else gloo.
        timeout_minutes: collective timeout.

    Raises:
        ValueError: the layout does not divide the world size (checked before any group is made).
        RuntimeError: the runtime is already initialised.
    """
    global _RUNTIME
    if _RUNTIME is not None:
        raise RuntimeError("nemo_opd runtime is already initialised; call teardown_runtime() first")
    parallel = parallel or ParallelConfig()
    world_size = (dist.get_world_size() if dist.is_initialized()
                  else int(os.environ.get("WORLD_SIZE", "1")))
    data_parallel_size = parallel.data_parallel_size(world_size)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = runtime_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        cpu_backend.apply_cpu_accommodations()

    owns_group = not dist.is_initialized()
    if owns_group:
        _init_process_group(backend, timedelta(minutes=timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        # Without CUDA the default backend already is gloo; extra gloo groups would be duplicates.
        create_gloo_process_groups=device.type == "cuda",
    )
    seed_all(seed)
    _RUNTIME = RuntimeInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend(),
        device=device, parallel=parallel, data_parallel_size=data_parallel_size,
        owns_process_group=owns_group,
    )
    logger.debug("runtime up: %s", _RUNTIME)
    return _RUNTIME


def teardown_runtime() -> None:
    """Destroy megatron's parallel state and, if this runtime created it, the process group."""
    global _RUNTIME
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _RUNTIME is not None and _RUNTIME.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _RUNTIME = None


@contextlib.contextmanager
def distributed_runtime(parallel: ParallelConfig | None = None, **kwargs) -> Iterator[RuntimeInfo]:
    """``with distributed_runtime(ParallelConfig(2)) as rt: ...`` — initialise, then tear down."""
    info = initialize_runtime(parallel, **kwargs)
    try:
        yield info
    finally:
        teardown_runtime()


def model_process_groups(parallel: ParallelConfig) -> ProcessGroupCollection:
    """Process groups for a model whose layout differs from the global (student's) one.

    Ranks are laid out TP-fastest, like megatron's default order. Expert parallelism gets
    megatron's second grid: experts split by TP (the expert-tensor-parallel size), then by EP
    out of the data-parallel ranks. Every rank must call this with the same ``parallel``
    (process-group creation is collective). For the global layout itself use
    ``ProcessGroupCollection.use_mpu_process_groups()``.
    """
    world_size = dist.get_world_size()
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep = parallel.expert_model_parallel_size
    dp = parallel.data_parallel_size(world_size)
    grid = HyperCommGrid([tp, 1, dp, pp], ["tp", "cp", "dp", "pp"])
    expert_grid = HyperCommGrid([tp, ep, dp // ep, pp], ["tp", "ep", "dp", "pp"])
    pgs = ProcessGroupCollection()
    pgs.tp = grid.create_pg("tp")
    pgs.cp = grid.create_pg("cp")
    pgs.dp = grid.create_pg("dp")
    pgs.pp = grid.create_pg("pp")
    pgs.tp_cp = grid.create_pg(["tp", "cp"])
    pgs.dp_cp = grid.create_pg(["cp", "dp"])
    pgs.tp_dp_cp = grid.create_pg(["tp", "cp", "dp"])
    pgs.mp = grid.create_pg(["tp", "pp"])
    pgs.ep = expert_grid.create_pg("ep")  # dense models: one rank each; megatron's DDP asks
    pgs.expt_tp = expert_grid.create_pg("tp")
    pgs.expt_dp = expert_grid.create_pg("dp")
    pgs.tp_ep = expert_grid.create_pg(["tp", "ep"])
    pgs.tp_ep_pp = expert_grid.create_pg(["tp", "ep", "pp"])
    pgs.embd = pgs.pp if pp > 1 else None
    pgs.pos_embd = None
    return pgs


_LAYOUT_OVERRIDES = (
    ("_MPU_TENSOR_MODEL_PARALLEL_RANK", parallel_state.set_tensor_model_parallel_rank, "tp", True),
    ("_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
     parallel_state.set_tensor_model_parallel_world_size, "tp", False),
    ("_MPU_PIPELINE_MODEL_PARALLEL_RANK", parallel_state.set_pipeline_model_parallel_rank, "pp",
     True),
    ("_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE",
     parallel_state.set_pipeline_model_parallel_world_size, "pp", False),
    ("_MPU_DATA_PARALLEL_RANK", parallel_state.set_data_parallel_rank, "dp_cp", True),
    ("_MPU_EXPERT_MODEL_PARALLEL_RANK", parallel_state.set_expert_model_parallel_rank, "ep", True),
    ("_MPU_EXPERT_MODEL_PARALLEL_WORLD_SIZE",
     parallel_state.set_expert_model_parallel_world_size, "ep", False),
    ("_MPU_EXPERT_TENSOR_PARALLEL_RANK", parallel_state.set_expert_tensor_parallel_rank,
     "expt_tp", True),
    ("_MPU_EXPERT_TENSOR_PARALLEL_WORLD_SIZE",
     parallel_state.set_expert_tensor_parallel_world_size, "expt_tp", False),
)
"""megatron's override of a global rank or size: (its variable, its setter, the group of
``groups`` it takes, rank (True) or size)."""
_GLOBAL_GROUPS = {name: attr for name, attr in (
    ("_TENSOR_MODEL_PARALLEL_GROUP", "tp"), ("_PIPELINE_MODEL_PARALLEL_GROUP", "pp"),
    ("_DATA_PARALLEL_GROUP", "dp"), ("_DATA_PARALLEL_GROUP_WITH_CP", "dp_cp"),
    ("_EXPERT_MODEL_PARALLEL_GROUP", "ep"), ("_EXPERT_TENSOR_PARALLEL_GROUP", "expt_tp"),
    ("_EXPERT_TENSOR_AND_MODEL_PARALLEL_GROUP", "tp_ep"),
    ("_EXPERT_DATA_PARALLEL_GROUP", "expt_dp"),
    # megatron-core >= 0.19 reads these by default (GTP weight-remat axis, size 1 here).
    ("_DATA_PARALLEL_GROUP_WITH_GTP_REMAT", "dp"),
    ("_DATA_PARALLEL_GROUP_WITH_CP_WITH_GTP_REMAT", "dp_cp"),
) if hasattr(parallel_state, name)}
"""megatron's global process groups (no setters) and the member of ``groups`` each takes."""


@contextlib.contextmanager
def model_parallel_layout(groups: ProcessGroupCollection) -> Iterator[None]:
    """Make megatron's global TP, PP and data-parallel layout (ranks, sizes, groups) read as
    ``groups``' inside the block.

    For library code that reads ``parallel_state`` instead of taking a group: ModelOpt's HF
    importer slices checkpoint tensors by the global TP rank, its exporter reads the pipeline
    rank, and checkpoint shardings come from the global groups even for a model built on its
    own (megatron's ``ensure_metadata_has_dp_cp_group``, ModelOpt's quantizer ``_amax``
    tensors): without them every rank restoring a whole model next to a TP/PP run would claim
    the same replica, or another rank's shard, and dist-checkpointing refuses the load. Ranks
    and sizes go through megatron's override setters; the groups have no setters and are
    swapped in place. Everything is restored on exit.
    """
    previous = [getattr(parallel_state, name) for name, *_ in _LAYOUT_OVERRIDES]
    groups_before = {name: getattr(parallel_state, name) for name in _GLOBAL_GROUPS}
    for _, setter, group, is_rank in _LAYOUT_OVERRIDES:
        pg = getattr(groups, group)
        setter(dist.get_rank(pg) if is_rank else dist.get_world_size(pg))
    for name, attr in _GLOBAL_GROUPS.items():
        setattr(parallel_state, name, getattr(groups, attr))
    try:
        yield
    finally:
        for (_, setter, *_), value in zip(_LAYOUT_OVERRIDES, previous, strict=True):
            setter(value)
        for name, value in groups_before.items():
            setattr(parallel_state, name, value)
