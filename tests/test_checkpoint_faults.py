"""Checkpoint faults: damaged newest checkpoints, a full disk, a rank failing its part of a save,
leftover partial saves, and a preemption signal to the whole process group.

Grouped into few processes (each start costs seconds): one rank runs every damage case and
the full disk (a small tmpfs; skipped unless this process may mount one); two ranks check that
they agree on a damaged checkpoint and on another rank's failed save; two training scripts in
their own process group (this file run as a script) are stopped by SIGTERM to the group and by
SIGUSR1 to the main process only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multirank import run_ranks
from test_train import _RESUME, _config, _losses

from nemo_opd.config import CheckpointConfig, OptimConfig

_SAVE_ALL = dict(_RESUME, checkpoint=CheckpointConfig(save_every=1, keep_last=4))
"""Replay buffer, rollouts and AdamW state all restored: resumed losses are exact."""


class _Records(logging.Handler):
    """Warnings and errors of the checkpoint module, as text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("nemo_opd.train.checkpoint").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _flip(path: Path, count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of ``path`` (its size stays)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def _fill(where: Path, leave: int) -> None:
    """Write a filler file so that about ``leave`` bytes stay free on ``where``'s file system."""
    free = shutil.disk_usage(where).free
    with open(where / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


# ---------------------------------------------------------------- one rank

def _one_rank_body(dirs: dict[str, str], data_file: str, root: str) -> dict:
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import Trainer, run_distillation
    from nemo_opd.train import checkpoint as ckpt
    from nemo_opd.train.optim import build_optimizer
    from nemo_opd.train.setup import build_fresh_student_shell

    root = Path(root)
    records = _Records()
    out: dict = {}
    with distributed_runtime(ParallelConfig(1), seed=7):
        full = run_distillation(_config(dirs, data_file, str(root / "full"), **_SAVE_ALL))
        out["full"] = _losses(full)
        shutil.copytree(root / "full", root / "run")
        cfg = _config(dirs, data_file, str(root / "run"), **_SAVE_ALL)
        steps = cfg.checkpoint_dir
        records.take()

        # Newest model shard truncated, then (once re-saved) 16 bytes flipped in the other one:
        # both times step 3 resumes and step 4 is trained again.
        for name, damage, shard in (("truncated", _truncate, "model/__0_0.distcp"),
                                    ("flipped", _flip, "model/__0_1.distcp")):
            damage(steps / "step_00000004" / shard)
            out[name] = {"losses": _losses(run_distillation(cfg)), "log": records.take()}

        # Newest: an optimizer shard deleted; the one before: a model shard flipped. Step 2
        # resumes; the damaged step 4 (a later step than the re-saved 3) is removed.
        (steps / "step_00000004" / "optimizer" / "__0_0.distcp").unlink()
        _flip(steps / "step_00000003" / "model" / "__0_0.distcp")
        out["two_damaged"] = {"losses": _losses(run_distillation(cfg)), "log": records.take(),
                              "kept": sorted(p.name for p in steps.iterdir())}

        # Without training: what verification and loading say about other damage.
        copy = root / "copy"
        shutil.copytree(steps / "step_00000004", copy)
        (copy / "trainer" / "rank_00000.pt").unlink()
        out["no_trainer_state"] = ckpt.verify_checkpoint(copy)
        try:
            ckpt.load_checkpoint(copy, None, None)  # refused before the model is touched
            out["load_error"] = None
        except ckpt.DamagedCheckpointError as err:
            out["load_error"] = str(err)
        (copy / "meta.json").write_text("")
        out["empty_meta"] = ckpt.verify_checkpoint(copy)
        (copy / ckpt.MANIFEST).unlink()
        out["no_manifest"] = ckpt.verify_checkpoint(copy)
        lone = root / "lone"
        (lone / "step_00000004").parent.mkdir()
        shutil.copytree(copy, lone / "step_00000004")
        out["none_verifies"] = {"latest": ckpt.latest_checkpoint(lone), "log": records.take()}

        # Partial saves left by a crash are removed at the next start.
        (steps / ".tmp_step_00000009" / "model").mkdir(parents=True)
        out["removed"] = [p.name for p in ckpt.remove_partial_saves(steps)]
        out["after_remove"] = sorted(p.name for p in steps.iterdir())
        out["remove_log"] = records.take()

        # A full disk: a 4 MiB tmpfs holds one checkpoint (~1.7 MB) and a filler file; the
        # save of step 2 fails early (model shards) and late (trainer state, meta, manifest).
        mount = root / "tmpfs"
        if not _mount_tmpfs(mount, 4 << 20):
            out["full_disk"] = None
            return out
        try:
            disk_cfg = _config(dirs, data_file, str(root / "disk"),
                               checkpoint=CheckpointConfig(dir=str(mount / "ckpt")))
            trainer = Trainer(disk_cfg)
            first = trainer.save(1)
            size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
            disk = {"errors": [], "left": []}
            for leave in (64 << 10, size - (8 << 10)):
                _fill(mount, leave)
                try:
                    trainer.save(2)
                    disk["errors"].append(None)
                except ckpt.CheckpointSaveError as err:
                    disk["errors"].append((str(err), err.no_space))
                disk["left"].append(sorted(p.name for p in (mount / "ckpt").iterdir()))
                (mount / "filler").unlink()
            disk["latest"] = ckpt.latest_checkpoint(mount / "ckpt").name
            _, _, state, meta = ckpt.load_checkpoint(
                mount / "ckpt" / "step_00000001", build_fresh_student_shell(disk_cfg),
                lambda m: build_optimizer(m, disk_cfg.optim, disk_cfg.total_steps))
            disk["loaded_step"] = (state["step"], meta["step"])
            disk["saved_after"] = trainer.save(2).name  # space again: saving works again
            disk["root"] = str(mount / "ckpt")
            out["full_disk"] = disk
        finally:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return out


@pytest.fixture(scope="module")
def one_rank(tiny_model_dirs, train_file, tmp_path_factory) -> dict:
    (out,) = run_ranks(_one_rank_body, world_size=1, dirs=tiny_model_dirs,
                       data_file=train_file, root=str(tmp_path_factory.mktemp("faults")),
                       timeout=300)
    return out


def _named(lines: list[str], *fragments: str) -> bool:
    return any(all(f in line for f in fragments) for line in lines)


@pytest.mark.multirank
def test_a_damaged_newest_checkpoint_is_skipped_and_resume_is_exact(one_rank):
    full = one_rank["full"]
    assert len(full) == 4
    for name, shard, why in (("truncated", "model/__0_0.distcp", "the manifest says"),
                             ("flipped", "model/__0_1.distcp", "sha256 mismatch")):
        case = one_rank[name]
        assert case["losses"] == full[3:], name  # step 4 again, from step 3: bitwise
        assert _named(case["log"], "skipping damaged checkpoint", "step_00000004", shard, why), \
            case["log"]
    two = one_rank["two_damaged"]
    assert two["losses"] == full[2:]
    assert _named(two["log"], "step_00000004", "optimizer/__0_0.distcp: missing")
    assert _named(two["log"], "step_00000003", "model/__0_0.distcp", "sha256 mismatch")
    assert _named(two["log"], "removing", "step_00000004", "later step")
    assert two["kept"] == ["step_00000001", "step_00000002", "step_00000003", "step_00000004"]


@pytest.mark.multirank
def test_missing_files_and_an_empty_meta_json_are_named(one_rank):
    assert one_rank["no_trainer_state"] == ["trainer/rank_00000.pt: missing"]
    assert "is damaged: trainer/rank_00000.pt: missing" in one_rank["load_error"]
    assert len(one_rank["empty_meta"]) == 2  # meta.json, and still the trainer state
    assert one_rank["empty_meta"][0].startswith("meta.json: 0 bytes, the manifest says")
    assert one_rank["no_manifest"] == [
        "manifest.json: missing (an unfinished save or a damaged checkpoint)"]
    lone = one_rank["none_verifies"]
    assert lone["latest"] is None
    assert _named(lone["log"], "skipping damaged checkpoint", "manifest.json: missing")
    assert _named(lone["log"], "no checkpoint under", "verifies")


@pytest.mark.multirank
def test_partial_saves_are_removed_at_the_next_start(one_rank):
    assert one_rank["removed"] == [".tmp_step_00000009"]
    assert not any(n.startswith(".tmp_") for n in one_rank["after_remove"])
    assert _named(one_rank["remove_log"], "removing", ".tmp_step_00000009")


@pytest.mark.multirank
def test_a_full_disk_names_the_directory_and_keeps_the_previous_checkpoint(one_rank):
    disk = one_rank["full_disk"]
    if disk is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    for error in disk["errors"]:
        assert error is not None, disk
        message, no_space = error
        assert no_space
        assert message.startswith(f"no space left on {disk['root']} while saving step 2"), message
    assert disk["left"] == [["step_00000001"], ["step_00000001"]]  # no .tmp_step_00000002
    assert disk["latest"] == "step_00000001"
    assert disk["loaded_step"] == (1, 1)
    assert disk["saved_after"] == "step_00000002"


# ---------------------------------------------------------------- two ranks

def _two_rank_body(dirs: dict[str, str], data_file: str, root: str) -> dict:
    import torch.distributed as dist

    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import Trainer
    from nemo_opd.train import checkpoint as ckpt

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = _Records()
    out: dict = {}
    with distributed_runtime(ParallelConfig(1), seed=7):
        cfg = _config(dirs, data_file, root, optim=OptimConfig(steps=2, micro_batch_size=1),
                      checkpoint=CheckpointConfig(save_every=1))
        trainer = Trainer(cfg)
        trainer.train()
        steps = Path(cfg.checkpoint_dir)
        # Rank 1's trainer state cannot be pickled: both ranks raise, naming rank 1.
        state = {"step": 3, "bad": (lambda: None) if rank == 1 else None}
        try:
            ckpt.save_checkpoint(steps, 3, trainer.models.student, trainer.optim, state,
                                 {"world_size": 2}, keep_last=2)
            out["error"] = None
        except ckpt.CheckpointSaveError as err:
            out["error"] = (str(err), err.no_space)
        out["left"] = sorted(p.name for p in steps.iterdir())
        # A file only rank 1 wrote, flipped by rank 0: both ranks fall back to step 1.
        if rank == 0:
            _flip(steps / "step_00000002" / "trainer" / "rank_00001.pt", 4)
        dist.barrier()
        out["latest"] = ckpt.latest_checkpoint(steps).name
        out["log"] = records.take()
    return out


@pytest.mark.multirank
def test_two_ranks_agree_on_a_failed_save_and_a_damaged_checkpoint(tiny_model_dirs, train_file,
                                                                  tmp_path):
    ranks = run_ranks(_two_rank_body, world_size=2, dirs=tiny_model_dirs, data_file=train_file,
                      root=str(tmp_path), timeout=240)
    for out in ranks:
        message, no_space = out["error"]
        assert not no_space
        assert message.startswith(f"saving step 3 into {tmp_path / 'checkpoints'} failed "
                                  "(rank 1: "), message
        assert "rank 0" not in message
        assert out["left"] == ["step_00000001", "step_00000002"]
        assert out["latest"] == "step_00000001"
    assert _named(ranks[0]["log"], "step_00000002", "trainer/rank_00001.pt", "sha256 mismatch")


# ---------------------------------------------------------------- signals

def _signalled_run(args: dict) -> None:
    """This file as a script: the recipe's preemption path on tiny models, one process."""
    from nemo_opd.console import configure_console
    from nemo_opd.launch.stages import exit_preempted
    from nemo_opd.runtime import ParallelConfig, distributed_runtime
    from nemo_opd.train import PreemptionFlag, run_distillation

    configure_console()
    cfg = _config(args["dirs"], args["data_file"], args["out"],
                  optim=OptimConfig(steps=200, micro_batch_size=2, lr=3e-3),
                  checkpoint=CheckpointConfig(save_every=1, keep_last=2))
    with distributed_runtime(ParallelConfig(1), seed=7):
        with PreemptionFlag() as preempted:
            result = run_distillation(cfg, should_stop=preempted)
        if result.preempted:
            exit_preempted(result.steps_done)


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in directory.glob("step_*")) if directory.is_dir() else []


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _run_until_signalled(args: dict, log: Path, sig: signal.Signals, *, group: bool,
                         after: int) -> tuple[int, str, list[int]]:
    """Start the script in a new session; once a checkpoint past step ``after`` exists, send
    ``sig`` to its process group or its main process; (exit code, log, group left after)."""
    steps = Path(args["out"]) / "checkpoints"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, __file__, json.dumps(args)], stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not [s for s in _steps(steps) if s > after]:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=120)
        for _ in range(100):  # the writer manager is shut down at exit
            left = _group_members(proc.pid)
            if not left:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None or _group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    return code, log.read_text(), left


def _stopped_at(log: str) -> int:
    line = next(line for line in log.splitlines() if "preempted at step" in line)
    return int(line.split("preempted at step ")[1].split(",")[0])


def test_a_signal_to_the_process_group_saves_the_step_in_flight(tiny_model_dirs, train_file,
                                                                 tmp_path):
    from nemo_opd.launch.stages import PREEMPTED_EXIT_CODE

    args = {"dirs": tiny_model_dirs, "data_file": train_file, "out": str(tmp_path / "run")}
    steps = tmp_path / "run" / "checkpoints"
    # SIGTERM to every process once the first checkpoint exists (megatron's writer manager
    # then exists too: it used to die and break the next save with a broken pipe).
    code, log, left = _run_until_signalled(args, tmp_path / "first.log", signal.SIGTERM,
                                           group=True, after=0)
    assert code == PREEMPTED_EXIT_CODE, log[-3000:]
    first = _stopped_at(log)
    assert _steps(steps)[-1] == first >= 1
    assert not list(steps.glob(".tmp_*"))
    assert left == []
    # Requeued: it resumes there; SIGUSR1 to the main process only stops it the same way.
    code, log, left = _run_until_signalled(args, tmp_path / "second.log", signal.SIGUSR1,
                                           group=False, after=first)
    assert code == PREEMPTED_EXIT_CODE, log[-3000:]
    assert f"resumed from {steps / f'step_{first:08d}'}" in log
    second = _stopped_at(log)
    assert _steps(steps)[-1] == second > first
    assert not list(steps.glob(".tmp_*"))
    assert left == []
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "event" not in m] == list(range(1, second + 1))


if __name__ == "__main__":
    _signalled_run(json.loads(sys.argv[1]))
