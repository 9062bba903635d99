"""Atomic, resumable training checkpoints on megatron-core distributed checkpointing.

Layout of one checkpoint, ``<root>/step_<N>/`` (``N`` = optimizer steps done)::

    model/            weights + ModelOpt quantizer state (nemo_opd.models.checkpoint)
    optimizer/        fp32 master weights and AdamW moments, sharded like their parameters
    trainer/rank_<r>.pt   this rank's RNG states, data position, replay buffer, counters
    meta.json         step, world size, layouts; written last

Atomicity: every rank writes into ``<root>/.tmp_step_<N>/``; after a barrier rank 0 renames it
to ``step_<N>`` (``os.rename`` is atomic on one file system) and only then deletes checkpoints
beyond ``keep_last``. A crash at any point before the rename leaves a ``.tmp_*`` directory that
:func:`latest_checkpoint` ignores (and the next save replaces), so the previous checkpoint is
what a restart finds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from nemo_opd.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from nemo_opd.train.optim import StudentOptimizer

__all__ = ["CHECKPOINT_PREFIX", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
_TMP_PREFIX = ".tmp_"


def _name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every generator the trainer draws from on this rank."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "megatron": get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["megatron"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the most steps under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
            and (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module,
                    optimizer: StudentOptimizer, trainer_state: dict[str, Any],
                    meta: dict[str, Any], *, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it); return its path.

    ``trainer_state`` is this rank's picklable state (RNG, data position, replay buffer, ...);
    ``meta`` is JSON-serialisable run information, identical on every rank.
    """
    root = Path(root)
    final, tmp = root / _name(step), root / f"{_TMP_PREFIX}{_name(step)}"
    if _rank() == 0:
        if tmp.exists():  # a previous save of this step crashed half-way
            shutil.rmtree(tmp)
        for sub in ("model", "optimizer", "trainer"):
            (tmp / sub).mkdir(parents=True)
    _barrier()
    save_model_checkpoint(model, tmp / "model")
    dist_checkpointing.save(optimizer.sharded_state_dict(model), str(tmp / "optimizer"))
    torch.save(trainer_state, tmp / "trainer" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        if final.exists():  # re-saving a step (e.g. after a resume at that step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        done = sorted((p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)),
                      key=lambda p: p.name)
        for old in done[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    build_optimizer: Callable[[torch.nn.Module], StudentOptimizer]
                    ) -> tuple[torch.nn.Module, StudentOptimizer, dict[str, Any], dict[str, Any]]:
    """Load checkpoint ``path`` into a freshly built, *unquantized* ``model``.

    ``build_optimizer(model)`` makes the optimizer once the model (with its quantizers) is
    restored. Returns ``(model, optimizer, this rank's trainer_state, meta)``; the caller restores
    RNG and data state from ``trainer_state``.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete nemo_opd checkpoint (no meta.json)")
    meta = json.loads(meta_file.read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta.get("world_size", world) != world:
        raise ValueError(f"{path} was written by {meta['world_size']} ranks, this job has "
                         f"{world}: per-rank RNG and data state cannot be mapped")
    model = load_model_checkpoint(model, path / "model")
    optimizer = build_optimizer(model)
    optimizer.load_state_dict(dist_checkpointing.load(
        optimizer.sharded_state_dict(model, is_loading=True), str(path / "optimizer")))
    trainer_state = torch.load(path / "trainer" / f"rank_{_rank():05d}.pt", weights_only=False)
    logger.info("resumed from %s (step %d)", path, meta["step"])
    return model, optimizer, trainer_state, meta
