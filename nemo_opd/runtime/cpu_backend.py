"""The CPU backend for megatron-core (and ModelOpt's Megatron plugin): every accommodation they
need to run without CUDA, in one place.

megatron-core is written for GPUs; a handful of call sites assume CUDA even when
``use_cpu_initialization=True`` and all fusions are off. Each accommodation below says which call
site it serves and why it is safe. They are applied by :func:`apply_cpu_accommodations`, which
the runtime calls only when ``torch.cuda.is_available()`` is False, and which is idempotent.
On a GPU machine nothing here runs.

1. **RNG-states tracker.** ``tensor_parallel.random.CudaRNGStatesTracker`` stores and swaps
   ``torch.cuda`` generator states (``model_parallel_cuda_manual_seed``, the ``fork()`` around
   dropout and weight init). :class:`CpuRNGStatesTracker` keeps the same named states
   (data-parallel, model-parallel, expert-parallel) as CPU generator states and is installed as
   megatron's global tracker, so seeding and ``fork()`` behave as on GPU.
2. **``torch.cuda.current_device()``** is used as a device argument in rotary embeddings
   (``RotaryEmbedding.__init__``/``forward``) and ``GlobalMemoryBuffer``. Without CUDA it raises.
   It is replaced by a function returning ``torch.device("cpu")``, which every tensor factory
   accepts as a device. Code that needs a real CUDA index cannot run on a CUDA-less machine
   anyway.
3. **Causal masks.** ``transformer.utils.get_default_causal_mask`` and
   ``get_sliding_window_causal_mask`` build masks with ``device="cuda"``; the softmax in
   ``fusions.fused_softmax`` calls them when no mask is passed. The copies bound in
   ``fused_softmax`` are replaced by device-neutral versions (same values, CPU tensors).
4. **``torch.cuda.synchronize()``** is called unconditionally by ModelOpt 0.47's
   ``_modelopt_get_extra_state`` (every quantized module's checkpoint state), so saving a
   quantized model fails on a CPU-only torch. Without CUDA there is nothing to synchronise: it
   becomes a no-op.
5. **Pipeline schedules.** megatron's ``forward_backward_pipelining_without_interleaving``
   creates its token counter with ``torch.zeros(..., device="cuda")``. :func:`cpu_device_scope`
   (entered around each schedule call by :mod:`nemo_opd.models.pipeline`) is a torch function
   mode that creates tensors asked for on ``"cuda"`` on the CPU instead; outside it nothing
   changes, and with CUDA it is a no-op.
6. **Activation recompute.** megatron's ``CheckpointFunction`` (selective and full recompute)
   saves and restores the CPU generator, the tracker's states and the CUDA generator through
   ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``. Without CUDA
   there is no CUDA generator: the getter returns an empty state and the setter ignores it,
   while the CPU generator and the (CPU) tracker states are saved and restored as on GPU, so a
   recomputed forward draws the same numbers.
7. **CUDA streams in DDP (megatron-core >= 0.19).** ``_ParamAndGradBucketGroup.start_grad_sync``
   begins with ``torch.cuda.current_stream()`` (to wait on CUDA-graph events that never exist
   on CPU), so every gradient reduction would raise. Without CUDA ``torch.cuda.current_stream``
   returns a null stream whose waits and synchronize do nothing: CPU work is already ordered.
8. **CUDA streams in MoE token dispatch.** ``MoEAlltoAllTokenDispatcher.__init__`` creates a
   ``torch.cuda.Stream()`` for its device-to-host copies of the routing splits, and its
   ``_maybe_dtoh_and_synchronize`` enters ``torch.cuda.stream(...)`` around them and records an
   event on the stream to synchronise on later. Without CUDA
   ``torch.cuda.Stream()`` is the same null stream as in 7 (so "current != side stream" is
   False, as on one CUDA stream) and ``torch.cuda.stream(...)`` enters nothing: the splits
   already are CPU tensors. megatron's ``maybe_move_tensor_to_cpu(t, as_numpy=True)`` turns
   the splits into NumPy arrays only when they were on the GPU, and ``all_to_all_single``
   rejects tensors as split sizes: the dispatcher's copy of it converts CPU tensors to NumPy
   too, so the all-to-all gets what it gets on GPU.
9. **MoE router without Transformer Engine.** ``moe_utils.RouterGatingLinearFunction`` tests
   ``te_general_gemm is not None`` to choose TE's GEMM over ``torch.mm``, but the name is only
   bound when TE imports (megatron-core 0.16-0.19), so every MoE forward without TE raises
   ``NameError``. The name is bound to ``None``: megatron's own torch path runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from torch.overrides import TorchFunctionMode

__all__ = [
    "CpuRNGStatesTracker",
    "apply_cpu_accommodations",
    "cpu_accommodations_applied",
    "cpu_device_scope",
    "install_cpu_rng_tracker",
]

logger = logging.getLogger(__name__)

_APPLIED = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG-states tracker on the CPU generator (``torch.get_rng_state``).

    ``add(name, seed)`` records the CPU generator state a ``torch.manual_seed(seed)`` would
    produce, without disturbing the current state; ``fork(name)`` swaps it in for the body of a
    ``with`` block and keeps its advanced state afterwards, exactly as the CUDA tracker does with
    CUDA generator states.
    """

    def __init__(self) -> None:
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added (seed the runtime first)")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(device: object = None) -> None:
    return None


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    ones = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def _no_cuda_rng_state(*args: object, **kwargs: object) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _ignore_cuda_rng_state(*args: object, **kwargs: object) -> None:
    return None


class _NullStream:
    """What ``torch.cuda.current_stream()`` returns without CUDA (accommodation 7)."""

    def wait_event(self, event: object) -> None:
        return None

    def wait_stream(self, stream: object) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: object = None) -> _NullStream:
        return self  # an event whose synchronize() is a no-op, like the stream's


_NULL_STREAM = _NullStream()


def _null_stream(*args: object, **kwargs: object) -> _NullStream:
    return _NULL_STREAM


def _no_stream_context(stream: object = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _tensor_to_cpu(tensor: object, as_numpy: bool = False, record_stream: bool = False) -> object:
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return moe_utils.maybe_move_tensor_to_cpu(tensor, as_numpy, record_stream)


def install_cpu_rng_tracker() -> None:
    """Make megatron's global RNG tracker a :class:`CpuRNGStatesTracker` (resetting its states)."""
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def apply_cpu_accommodations() -> None:
    """Apply the accommodations above (no-op when CUDA is available or already applied)."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    install_cpu_rng_tracker()
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_synchronize
    torch.cuda.current_stream = _null_stream
    torch.cuda.Stream = _null_stream
    torch.cuda.stream = _no_stream_context
    mcore_random._get_cuda_rng_state = _no_cuda_rng_state
    mcore_random._set_cuda_rng_state = _ignore_cuda_rng_state
    fused_softmax.get_default_causal_mask = _causal_mask
    fused_softmax.get_sliding_window_causal_mask = _sliding_window_causal_mask
    token_dispatcher.maybe_move_tensor_to_cpu = _tensor_to_cpu
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _APPLIED = True
    logger.debug("megatron-core CPU accommodations applied")


def cpu_accommodations_applied() -> bool:
    """Whether :func:`apply_cpu_accommodations` has patched this process."""
    return _APPLIED


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """Every torch call with ``device="cuda"`` (or a CUDA ``torch.device``) runs on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cpu_device_scope() -> contextlib.AbstractContextManager:
    """Accommodation 5: CUDA-device tensor factories land on the CPU inside the block (a no-op
    unless the CPU accommodations are applied)."""
    return _CudaFactoriesOnCpu() if _APPLIED else contextlib.nullcontext()
