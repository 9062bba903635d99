"""Which process logs and writes files (torch.distributed only: no megatron-core import)."""

import torch.distributed as dist

__all__ = ["is_rank0"]


def is_rank0() -> bool:
    """True on global rank 0, or without torch.distributed: the rank that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0
