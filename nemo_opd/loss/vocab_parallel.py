"""Vocab-parallel plumbing shared by every loss: shard layout, input agreement, token chunks.

Logits arrive as ``[N, V_local]``: ``N`` tokens replicated on every rank of the tensor-parallel
(TP) group, ``V_local`` the rank's contiguous slice of the vocabulary, shards in rank order (what
megatron-core's ``ColumnParallelLinear`` output layer produces). ``tp_group=None`` means the
whole vocabulary is local.

Every tensor handed to a collective is made contiguous first: gloo silently sends wrong data for
non-contiguous tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "VocabShard",
    "RowChunk",
    "agree_on_inputs",
    "check_beta",
    "check_chunk_tokens",
    "check_logits",
    "check_temperature",
    "check_weights",
    "compute_dtype",
    "default_chunk_tokens",
    "row_chunks",
    "valid_rows",
]

# Elements of one float32 chunk temporary. On CPU a chunk that stays in L2 cache is several
# times faster per element than a large one; on GPU large chunks amortise kernel launches.
_CPU_CHUNK_ELEMENTS = 2**18
_CUDA_CHUNK_ELEMENTS = 2**25


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16, fp16, fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_tokens(v_local: int, device: torch.device) -> int:
    """Tokens per chunk so that one compute-dtype ``[chunk, V_local]`` temporary stays small."""
    budget = _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS
    return max(1, budget // max(1, v_local))


def check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")


def check_chunk_tokens(chunk_tokens: int | None) -> None:
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens!r}")


def check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_weights(weights: torch.Tensor | None, lead: torch.Size, name: str = "weights"
                  ) -> None:
    """Per-token loss weights: None, or a constant, finite, non-negative float tensor of shape
    ``lead`` (replicated over TP like the tokens)."""
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor or None, got "
                         f"{getattr(weights, 'dtype', type(weights).__name__)}")
    if tuple(weights.shape) != tuple(lead):
        raise ValueError(f"{name} shape {tuple(weights.shape)} must equal the tokens' shape "
                         f"{tuple(lead)}")
    if weights.requires_grad:
        raise ValueError(f"{name} must be constants (detach them): no gradient flows through "
                         "a loss weight")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """Where this rank's vocabulary slice sits, and the TP collectives over it."""

    group: dist.ProcessGroup | None
    """The TP group, or None when the whole vocabulary is local."""
    start: int
    """Global vocabulary id of local column 0."""
    local_size: int
    """``V_local``."""
    vocab_size: int
    """Global vocabulary size (sum of the shard sizes)."""
    largest_shard: int
    """The largest ``V_local`` in the group (shards may differ by a few entries)."""
    tp_size: int
    """Ranks in the group (1 without a group)."""

    @property
    def parallel(self) -> bool:
        return self.tp_size > 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[tp, *tensor.shape]``: every rank's ``tensor``, in rank order."""
        if not self.parallel:
            return tensor.unsqueeze(0)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.stack(parts)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group (a new tensor; the input is not modified)."""
        if not self.parallel:
            return tensor
        tensor = tensor.contiguous().clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor



def check_logits(tensor: torch.Tensor, name: str) -> None:
    """A logits-like tensor: floating point with a last (vocabulary or hidden) dimension."""
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have a last (vocabulary) dimension, got a 0-d tensor")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {tensor.dtype}")


def agree_on_inputs(
    tp_group: dist.ProcessGroup | None,
    *,
    lead: torch.Size,
    v_local: int,
    other_lead: torch.Size | None,
    other_vocab: int | None,
    mask: torch.Tensor | None,
    device: torch.device,
    what: str = "teacher_logits",
) -> VocabShard:
    """Check shapes on every TP rank at once and return this rank's :class:`VocabShard`.

    One all-gather of a few integers, so that a problem on one rank raises the same
    ``ValueError`` on all of them instead of leaving the others waiting in a collective.

    Args:
        lead, v_local: the student's leading (token) shape and local vocabulary size.
        other_lead, other_vocab: the teacher-side input's (``what``) leading shape and local
            vocabulary size; None skips that check.
        mask: must have shape ``lead``.
        device: where the collective's tensor lives (the logits' device: NCCL needs CUDA).
    """
    lead_ok = other_lead is None or tuple(other_lead) == tuple(lead)
    vocab_ok = other_vocab is None or other_vocab == v_local
    mask_ok = mask is None or tuple(mask.shape) == tuple(lead)
    n_valid = lead.numel() if mask is None or not mask_ok else int((mask != 0).sum())
    local = torch.tensor([lead.numel(), v_local, int(lead_ok), int(vocab_ok), int(mask_ok),
                          n_valid], dtype=torch.int64, device=device)
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    probe = VocabShard(tp_group, 0, v_local, v_local, v_local, tp_size)
    table = probe.all_gather(local)  # [tp, 6]
    rank = dist.get_rank(tp_group) if probe.parallel else 0

    def _where(column: int) -> str:
        ranks = (table[:, column] == 0).nonzero().flatten().tolist()
        return f" (on tp rank(s) {ranks})" if probe.parallel else ""

    if not bool(table[:, 2].all()):
        raise ValueError(f"{what} leading shape must equal the student's {tuple(lead)}, got "
                         f"{tuple(other_lead) if other_lead is not None else None}{_where(2)}")
    if not bool(table[:, 3].all()):
        raise ValueError(f"vocabulary shard mismatch: the student has {v_local} local vocabulary "
                         f"entries, {what} has {other_vocab}{_where(3)}; both must be the same TP "
                         "shard of the same vocabulary")
    if not bool(table[:, 4].all()):
        raise ValueError(f"mask shape must equal the tokens' shape {tuple(lead)}, got "
                         f"{tuple(mask.shape) if mask is not None else None}{_where(4)}")
    if not bool((table[:, 0] == table[0, 0]).all()) or not bool((table[:, 5] == table[0, 5]).all()):
        raise ValueError("tokens must be replicated across the TP group: token counts "
                         f"{table[:, 0].tolist()} and valid-token counts {table[:, 5].tolist()} "
                         "differ between ranks")
    if not bool((table[:, 1] > 0).all()):
        raise ValueError(f"empty local vocabulary shard{_where(1)}")
    sizes = table[:, 1].tolist()
    return VocabShard(tp_group, int(sum(sizes[:rank])), v_local, int(sum(sizes)), int(max(sizes)),
                      tp_size)


def valid_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices of the valid rows, or None when every row is valid (no index needed)."""
    if mask is None:
        return None
    flat = mask.reshape(-1) != 0
    if bool(flat.all()):
        return None
    return flat.nonzero().flatten()


@dataclasses.dataclass(frozen=True)
class RowChunk:
    """A block of rows of a ``[N, ...]`` tensor: a slice (a view) or an index (a copy)."""

    index: slice | torch.Tensor

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(self.index, slice):
            return tensor[self.index]
        return tensor.index_select(0, self.index)

    def put(self, dst: torch.Tensor, src: torch.Tensor, scale: float = 1.0) -> None:
        """``dst[rows] = src * scale`` (``src`` scaled in place), cast to ``dst``'s dtype once."""
        if scale != 1.0:
            src.mul_(scale)
        if isinstance(self.index, slice):
            dst[self.index] = src
        else:
            dst.index_copy_(0, self.index, src.to(dst.dtype))


def row_chunks(n_rows: int, rows: torch.Tensor | None, chunk_tokens: int) -> Iterator[RowChunk]:
    """Chunks of ``chunk_tokens`` rows over all rows, or over ``rows`` (the valid ones) only."""
    if rows is None:
        for start in range(0, n_rows, chunk_tokens):
            yield RowChunk(slice(start, min(start + chunk_tokens, n_rows)))
    else:
        for start in range(0, rows.numel(), chunk_tokens):
            yield RowChunk(rows[start:start + chunk_tokens])
