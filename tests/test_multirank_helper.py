"""The multi-rank harness itself: results come back per rank, failures carry the rank's
traceback, and a rank stuck in a collective becomes a failure instead of a hang."""

import pytest
from multirank import MultiRankError, run_ranks


def _rank_and_sum(offset: int) -> tuple[int, float]:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def _rank1_raises() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank one")


def _rank1_stalls() -> None:
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: rank 0 waits forever
    else:
        time.sleep(3600)


def test_results_are_ordered_by_rank():
    assert run_ranks(_rank_and_sum, world_size=2, offset=10) == [(0, 21.0), (1, 21.0)]


def test_failing_rank_reports_its_traceback():
    with pytest.raises(MultiRankError, match=r"(?s)rank 1 failed.*ValueError: boom on rank one"):
        run_ranks(_rank1_raises, world_size=2)


def test_stuck_collective_times_out_instead_of_hanging():
    with pytest.raises(MultiRankError, match="did not finish within"):
        run_ranks(_rank1_stalls, world_size=2, timeout=8)
