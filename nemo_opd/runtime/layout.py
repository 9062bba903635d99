"""The parallel layout of one model, as plain data: imported by configs and command lines
without megatron-core or torch (``nemo_opd.runtime.distributed`` builds the groups)."""

import dataclasses

__all__ = ["ParallelConfig"]


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout of one model. Data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (and the vocabulary of the logits)."""

    pipeline_model_parallel_size: int = 1
    """Ranks that split the stack of layers."""

    expert_model_parallel_size: int = 1
    """Ranks that split the routed experts of each MoE layer (expert parallelism). They come out
    of the data-parallel ranks, as in megatron-core: the data-parallel size must be a multiple.
    Experts are further split by TP (megatron's default expert-tensor-parallel size). Dense
    models leave it at 1."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism: layer norms and dropout work on ``[s/tp, b, h]`` shards
    (activations divided by TP outside the matmuls). Needs TP > 1, and on CPU is refused (its
    fused kernels need CUDA and apex / Transformer Engine)."""

    def __post_init__(self) -> None:
        for field in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                      "expert_model_parallel_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"ParallelConfig.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"ParallelConfig.sequence_parallel must be a bool, got "
                             f"{self.sequence_parallel!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("ParallelConfig.sequence_parallel = True needs "
                             "tensor_model_parallel_size > 1 (it shards activations over TP)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size in a job of ``world_size`` ranks; raises if the layout won't fit."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) = {self.model_parallel_size}"
            )
        data_parallel = world_size // self.model_parallel_size
        if data_parallel % self.expert_model_parallel_size:
            raise ValueError(
                f"expert_model_parallel_size = {self.expert_model_parallel_size} must divide the "
                f"data-parallel size {data_parallel} (world size {world_size} / "
                f"(TP x PP) {self.model_parallel_size}): expert-parallel ranks are carved out "
                "of the data-parallel ones")
        return data_parallel
