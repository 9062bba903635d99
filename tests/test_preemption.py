"""Saving on preemption: ``should_stop`` set on one of two ranks stops both at the same step with
a checkpoint there, the resumed run reproduces the uninterrupted losses exactly (one spawn of
2 gloo ranks: each spawn costs seconds), :class:`PreemptionFlag` turns SIGUSR1/SIGTERM into that
flag, and the recipe's exit helper exits non-zero."""

from __future__ import annotations

import json
import os
import signal

import pytest
from multirank import run_ranks
from test_train import _RESUME, _config, _losses

from nemo_opd.config import CheckpointConfig

# Replay buffer + sampling seeds + AdamW state must all be restored; no periodic saves, so the
# only checkpoint before the end is the one preemption writes.
_PREEMPT = dict(_RESUME, checkpoint=CheckpointConfig(save_every=0))


class StopAfter:
    """``should_stop``: True from its ``n``-th call on (it is called once per optimizer step)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _checkpoints(result) -> list[str]:
    return sorted(p.name for p in result.last_checkpoint.parent.iterdir())


def _body(dirs: dict[str, str], data_file: str, root: str) -> dict:
    import torch.distributed as dist

    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import run_distillation

    # Two ranks, student TP=1: two data-parallel ranks. Only rank 1 is "signalled" (its
    # should_stop turns True after its second step); rank 0's never does.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with distributed_runtime(ParallelConfig(1), seed=7):
        full = run_distillation(_config(dirs, data_file, f"{root}/full", **_PREEMPT),
                                should_stop=lambda: False)
        cfg = _config(dirs, data_file, f"{root}/parts", **_PREEMPT)
        stop = StopAfter(2 if rank == 1 else 10**9)
        first = run_distillation(cfg, should_stop=stop)
        stopped = {"preempted": first.preempted, "steps_done": first.steps_done,
                   "steps": [h["step"] for h in first.history], "calls": stop.calls,
                   "checkpoints": _checkpoints(first), "last": first.last_checkpoint.name}
        events = ([json.loads(line) for line in open(first.metrics_file) if '"event"' in line]
                  if first.metrics_file else None)
        second = run_distillation(cfg, should_stop=lambda: False)
    return {"stopped": stopped, "events": events,
            "resumed": {"preempted": second.preempted, "steps_done": second.steps_done,
                        "steps": [h["step"] for h in second.history]},
            "full_preempted": full.preempted,
            "full": _losses(full), "parts": _losses(first) + _losses(second)}


@pytest.mark.multirank
def test_should_stop_on_one_rank_saves_and_resume_is_exact(tiny_model_dirs, train_file,
                                                           tmp_path):
    ranks = run_ranks(_body, world_size=2, dirs=tiny_model_dirs, data_file=train_file,
                      root=str(tmp_path), timeout=240)
    for out in ranks:
        # Both ranks stop after step 2 with step 2's checkpoint (no periodic saves).
        assert out["stopped"] == {"preempted": True, "steps_done": 2, "steps": [1, 2],
                                  "calls": 2, "checkpoints": ["step_00000002"],
                                  "last": "step_00000002"}, ranks
        assert out["resumed"] == {"preempted": False, "steps_done": 4, "steps": [3, 4]}
        assert not out["full_preempted"]
        assert len(out["full"]) == 4
        assert out["parts"] == out["full"]  # bitwise
    events = ranks[0]["events"]  # rank 0 writes the JSONL
    assert [(e["step"], e["event"]) for e in events] == [(2, "preempted")]
    assert events[0]["checkpoint"].endswith("step_00000002")


def test_preemption_flag_catches_signals_and_restores_handlers():
    from nemo_opd.train import PreemptionFlag

    seen: list[int] = []

    def previous(signum, frame):
        seen.append(signum)

    original = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with PreemptionFlag() as flag:
            assert not flag()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert flag() and flag.received == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGTERM)  # caught too: the process lives on
            assert flag.received == signal.SIGUSR1  # the first one is kept
        assert flag()  # sticky after exit
        assert seen == []  # the previous handler did not run while the flag was installed
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]

        with PreemptionFlag() as other:  # a fresh flag starts unset
            assert not other()
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def test_recipe_exits_nonzero_when_preempted(caplog):
    from nemo_opd.launch.stages import PREEMPTED_EXIT_CODE, exit_preempted

    with caplog.at_level("WARNING"), pytest.raises(SystemExit) as exit_info:
        exit_preempted(7)
    assert exit_info.value.code == PREEMPTED_EXIT_CODE != 0
    assert "preempted at step 7, checkpoint saved; a requeue or rerun resumes from it" \
        in caplog.text


def _blocked_signals(pid: int) -> set[signal.Signals]:
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigBlk:"))
    mask = int(line.split()[1], 16)
    return {s for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) if mask >> (s - 1) & 1}


def test_processes_started_during_a_save_ignore_preemption_signals():
    """What keeps megatron's checkpoint writer processes alive on ``kill -TERM -<pgid>``: a
    process started inside ``preemption_signals_blocked`` (here ``sleep``) inherits the block;
    the trainer's own signal arrives once the block ends."""
    import subprocess

    from nemo_opd.train import PreemptionFlag
    from nemo_opd.train.preemption import preemption_signals_blocked

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with PreemptionFlag() as flag:
        with preemption_signals_blocked():
            assert {signal.SIGUSR1, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK,
                                                                              [])
            child = subprocess.Popen(["sleep", "30"])
            try:
                assert _blocked_signals(child.pid) == {signal.SIGUSR1, signal.SIGTERM}
                child.send_signal(signal.SIGTERM)
                with pytest.raises(subprocess.TimeoutExpired):
                    child.wait(timeout=0.5)  # still alive: the signal waits, blocked
            finally:
                child.kill()
                child.wait()
            os.kill(os.getpid(), signal.SIGUSR1)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        assert flag.received == signal.SIGUSR1

