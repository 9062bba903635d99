"""Run a test body on N gloo ranks in spawned processes.

``run_ranks(fn, world_size=2, **kwargs)`` starts ``world_size`` processes with torchrun's
environment variables set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), calls ``fn(**kwargs)`` in each, and returns the per-rank return values.
A rank that raises makes the call fail with that rank's traceback; a rank that does not finish
within ``timeout`` seconds makes it fail too (all ranks are killed), so a collective that waits
forever cannot hang the test suite.

``fn`` must be a module-level function (it is pickled by name for the spawned process).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_ranks", "MultiRankError"]


class MultiRankError(AssertionError):
    """A rank raised or timed out; the message carries the rank's traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., Any], kwargs: dict,
               results: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        # Plain pickle (by value): torch's multiprocessing reductions would share tensors through
        # file descriptors that vanish when this process exits before the parent reads them.
        value = pickle.dumps(fn(**kwargs))
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent, not vanish
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *, timeout: float = 300.0,
              **kwargs: Any) -> list[Any]:
    """Run ``fn(**kwargs)`` on ``world_size`` ranks; return their results ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # Not daemonic: ranks may start workers of their own (dist_checkpointing's writers); the
    # `finally` below kills whatever is still alive.
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, kwargs, results))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    outcomes: dict[int, tuple[bool, Any]] = {}
    finished = False
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise MultiRankError(f"ranks {missing} did not finish within {timeout:.0f} s "
                                     f"(a collective waiting on a rank that failed or skipped it?)"
                                     + _failures_text(outcomes))
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:  # nothing reported yet: check nobody died silently
                dead = [r for r, p in enumerate(procs)
                        if r not in outcomes and p.exitcode not in (None, 0)]
                if dead:
                    raise MultiRankError(f"rank {dead[0]} died with exit code "
                                         f"{procs[dead[0]].exitcode}"
                                         + _failures_text(outcomes)) from None
                continue
            outcomes[rank] = (ok, value)
            if not ok:
                # Give the other ranks a moment to report their own error, then fail.
                time.sleep(0.5)
                while True:
                    try:
                        r2, ok2, v2 = results.get_nowait()
                    except queue.Empty:  # nothing reported yet: check nobody died silently
                        break
                    outcomes[r2] = (ok2, v2)
                raise MultiRankError(_failures_text(outcomes).lstrip("\n"))
        finished = True
    finally:
        for proc in procs:
            # After a failure the other ranks may be blocked in a collective: do not wait on them.
            proc.join(timeout=10 if finished else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]


def _failures_text(outcomes: dict[int, tuple[bool, Any]]) -> str:
    return "".join(f"\n--- rank {r} failed ---\n{v}" for r, (ok, v) in sorted(outcomes.items())
                   if not ok)
