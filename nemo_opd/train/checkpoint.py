"""Atomic, verified, resumable training checkpoints on megatron-core distributed checkpointing.

Layout of one checkpoint, ``<root>/step_<N>/`` (``N`` = optimizer steps done)::

    model/            weights + ModelOpt quantizer state (nemo_opd.models.checkpoint)
    optimizer/        fp32 master weights and AdamW moments, sharded like their parameters
    trainer/rank_<r>.pt   this rank's RNG states, data position, replay buffer, counters
    meta.json         step, world size, layouts
    manifest.json     size and SHA-256 of every file above; written last

Atomicity: every rank writes into ``<root>/.tmp_step_<N>/``; the ranks then hash the files
(each a share), rank 0 writes the manifest and renames the directory to ``step_<N>``
(``os.rename`` is atomic on one file system) and only then prunes old checkpoints. A crash
before the rename leaves a ``.tmp_*`` directory that nothing reads and that
:func:`remove_partial_saves` deletes at the next start; a save that fails (full disk, a rank's
error) removes it itself, on every rank's agreement, and raises :class:`CheckpointSaveError`.

Verification: :func:`verify_checkpoint` compares sizes and SHA-256 digests with the manifest
and names every file that differs; :func:`latest_checkpoint` returns the newest checkpoint that
verifies and logs the damaged ones it skipped; :func:`load_checkpoint` refuses a damaged one.
Hashing is split over the ranks (by bytes) and over a few threads per rank, and every rank gets
the same verdict. Pruning keeps the just-written checkpoint (verified by construction) and the
``keep_last - 1`` newest older ones, so it never leaves no verified checkpoint.

Process-group signals: a save runs inside
:func:`~nemo_opd.train.preemption.preemption_signals_blocked`, so the writer processes megatron
starts survive ``kill -TERM -<pgid>`` and the trainer can still save the step in flight.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
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
from torch.distributed.checkpoint import CheckpointException

from nemo_opd.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from nemo_opd.train.optim import StudentOptimizer
from nemo_opd.train.preemption import preemption_signals_blocked

__all__ = ["CHECKPOINT_PREFIX", "MANIFEST", "CheckpointSaveError", "DamagedCheckpointError",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint", "verify_checkpoint",
           "remove_partial_saves", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
MANIFEST = "manifest.json"
"""Per checkpoint: ``{"format": 1, "files": {relative path: {"size": bytes, "sha256": hex}}}``."""
_TMP_PREFIX = ".tmp_"
_HASH_THREADS = 4
"""Files hashed at once per rank (hashlib releases the GIL on large buffers)."""
_CHUNK = 8 << 20
_LOW_SPACE = 64 << 20
"""Below this many free bytes, a short write ("unexpected pos") counts as a full disk."""
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed")
"""What torch's zip writer (torch.save, megatron's shard files) raises on a short write."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint whose files differ from its manifest; ``problems`` names each file."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"checkpoint {path} is damaged: " + "; ".join(problems))
        self.path, self.problems = path, problems


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; every rank raises it, and the partial directory is gone."""

    def __init__(self, message: str, *, no_space: bool) -> None:
        super().__init__(message)
        self.no_space = no_space


def _name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    """The step of a ``step_<N>`` directory, else None."""
    if not path.name.startswith(CHECKPOINT_PREFIX) or not path.is_dir():
        return None
    digits = path.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if digits.isdigit() else None


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


# ------------------------------------------------------------------ collectives (default group)

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank, on every rank."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------ hashing

def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _my_share(sizes: dict[str, int]) -> list[str]:
    """The files this rank hashes: largest first to the least-loaded rank (same on all ranks)."""
    load, mine, rank = [0] * _world(), [], _rank()
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(range(len(load)), key=load.__getitem__)
        load[owner] += sizes[name] + 1
        if owner == rank:
            mine.append(name)
    return mine


def _hash_files(directory: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    if not names:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(_HASH_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: _hash_file(directory / n), names),
                        strict=True))


def _list_files(directory: Path) -> dict[str, int]:
    """``{relative posix path: size}`` of every file under ``directory`` but the manifest."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size
            for p in sorted(directory.rglob("*"))
            if p.is_file() and p != directory / MANIFEST}


# ------------------------------------------------------------------ verification

# Checkpoints this process verified or wrote (rank 0), by resolved path: their manifest and
# every file's (size, mtime) then. load_checkpoint right after latest_checkpoint does not hash
# everything twice; a file changed since (size or mtime) makes it hash again.
_VERIFIED: dict[str, tuple[bytes, tuple]] = {}


def _fingerprint(path: Path, files: dict[str, Any]) -> tuple | None:
    try:
        return tuple((name, (st := (path / name).stat()).st_size, st.st_mtime_ns)
                     for name in sorted(files))
    except OSError:
        return None


def _read_manifest(path: Path) -> tuple[dict[str, dict[str, Any]] | None, str | None, bytes]:
    """(files, problem, raw bytes) of ``path``'s manifest, read on this rank."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None, f"{MANIFEST}: missing (an unfinished save or a damaged checkpoint)", b""
    except OSError as err:
        return None, f"{MANIFEST}: unreadable ({err})", b""
    try:
        files = json.loads(raw)["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in files.values()):
            raise ValueError("no file table")
    except (ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST}: not a valid manifest ({err})", raw
    return files, None, raw


def _check_share(path: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    problems, to_hash = [], []
    for name in _my_share({n: int(f["size"]) for n, f in files.items()}):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as err:
            problems.append(f"{name}: unreadable ({err})")
            continue
        if size != files[name]["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {files[name]['size']}")
        else:
            to_hash.append(name)
    try:
        hashed = _hash_files(path, to_hash)
    except OSError as err:
        return [*problems, f"unreadable while hashing ({err})"]
    problems += [f"{name}: content differs from the manifest (sha256 mismatch)"
                 for name, (_, digest) in hashed.items() if digest != files[name]["sha256"]]
    return problems


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with checkpoint ``path`` (``[]``: every file matches its manifest).

    Collective when torch.distributed is initialised (call it on every rank): rank 0 reads the
    manifest, every rank checks a share of the files, and all ranks return the same list. A
    checkpoint this process already verified or wrote is not hashed again while its manifest
    and every file's size and modification time are unchanged.
    """
    path = Path(path)
    header = None
    if _rank() == 0:
        files, problem, raw = _read_manifest(path)
        seen = (raw, _fingerprint(path, files)) if problem is None else None
        cached = seen is not None and seen[1] is not None and \
            _VERIFIED.get(str(path.resolve())) == seen
        header = (files if problem is None and not cached else None, problem)
    files, problem = _from_rank0(header)
    if problem is not None:
        return [problem]
    if files is None:  # verified before, manifest unchanged
        return []
    problems = sorted(p for share in _gathered(_check_share(path, files)) for p in share)
    if not problems and _rank() == 0:
        _VERIFIED[str(path.resolve())] = seen
    return problems


def latest_checkpoint(root: str | Path, *, verify: bool = True) -> Path | None:
    """The checkpoint with the most steps under ``root`` that verifies (None if there is none).

    Damaged newer checkpoints are skipped with a warning naming their bad files. Collective
    when torch.distributed is initialised (rank 0 lists ``root``; see :func:`verify_checkpoint`).
    ``verify=False`` only returns the newest complete one (it has a manifest), without hashing.
    """
    root = Path(root)
    candidates = None
    if _rank() == 0:
        found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None] \
            if root.is_dir() else []
        candidates = [p for _, p in sorted(found, reverse=True)]
    candidates = _from_rank0(candidates)
    if not verify:
        return next((p for p in candidates if (p / MANIFEST).is_file()), None)
    for path in candidates:
        problems = verify_checkpoint(path)
        if not problems:
            return path
        if _rank() == 0:
            logger.warning("skipping damaged checkpoint %s: %s", path, "; ".join(problems))
    if candidates and _rank() == 0:
        logger.error("no checkpoint under %s verifies", root)
    return None


def remove_partial_saves(root: str | Path) -> list[Path]:
    """Delete the ``.tmp_*`` directories that crashed saves left under ``root`` (rank 0 only;
    call it on every rank or on rank 0 before the first save); return what was removed."""
    root = Path(root)
    if _rank() != 0 or not root.is_dir():
        return []
    removed = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.startswith(_TMP_PREFIX)]
    for path in removed:
        logger.warning("removing %s, left by a checkpoint save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ------------------------------------------------------------------ saving

def _no_space(err: BaseException, root: Path) -> bool:
    """Whether ``err`` (or an error it came from) is a full disk or quota."""
    todo, texts = [err], []
    while todo and len(texts) < 32:
        err = todo.pop()
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
            return True
        texts.append(str(err))
        todo += [e for e in (err.__cause__, err.__context__) if e is not None]
        if isinstance(err, CheckpointException):  # the writer ranks' errors
            todo += [e for e, _ in err.failures.values() if isinstance(e, BaseException)]
    text = "\n".join(texts)
    if any(marker in text for marker in _NO_SPACE_TEXT):
        return True
    if any(marker in text for marker in _SHORT_WRITE_TEXT):
        try:
            return shutil.disk_usage(root).free < _LOW_SPACE
        except OSError:
            return False
    return False


def _summary(err: BaseException) -> str:
    """One line of ``err`` (megatron's CheckpointException carries whole tracebacks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _on_all_ranks(step: int, root: Path, work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` here; every rank's result, by rank, once every rank finished it.

    A rank whose ``work`` raised makes every rank raise :class:`CheckpointSaveError` (chained
    to the local error where there is one): the failure is all-gathered instead of left to a
    collective that the failed rank never joins.
    """
    error, result = None, None
    try:
        result = work()
    # torch's CheckpointException (megatron's failed shard writes) derives from BaseException.
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - must reach other ranks
        error = err
    report = None if error is None else (_no_space(error, root), _summary(error))
    outcomes = _gathered((report, result))
    failed = {rank: rep for rank, (rep, _) in enumerate(outcomes) if rep is not None}
    if not failed:
        return [res for _, res in outcomes]
    no_space = any(full for full, _ in failed.values())
    detail = "; ".join(f"rank {rank}: {text}" for rank, (_, text) in failed.items())
    if no_space:
        message = (f"no space left on {root} while saving step {step} ({detail}); the partial "
                   "save was removed and the previous checkpoint is kept")
    else:
        message = (f"saving step {step} into {root} failed ({detail}); the partial save was "
                   "removed and the previous checkpoint is kept")
    raise CheckpointSaveError(message, no_space=no_space) from error


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Keep ``step`` and the ``keep_last - 1`` newest older checkpoints. Checkpoints of later
    steps belong to an abandoned run (a resume from an older one, or ``resume=false``): they
    would shadow this one, so they go too."""
    steps = {s: p for p in root.iterdir() if (s := _step_of(p)) is not None}
    older = sorted((s for s in steps if s < step), reverse=True)
    for s in sorted(s for s in steps if s > step):
        logger.warning("removing %s: a later step than the checkpoint just saved, from an "
                       "abandoned run", steps[s])
        shutil.rmtree(steps[s], ignore_errors=True)
    for s in older[max(keep_last - 1, 0):]:
        shutil.rmtree(steps[s], ignore_errors=True)


def _publish(root: Path, tmp: Path, final: Path, step: int, shares: list[dict],
             keep_last: int) -> None:
    """Rank 0: manifest, rename into place, prune."""
    files = {name: {"size": size, "sha256": digest}
             for share in shares for name, (size, digest) in sorted(share.items())}
    manifest = json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=1)
    with open(tmp / MANIFEST, "w") as f:
        f.write(manifest)
        f.flush()
        os.fsync(f.fileno())
    replaced = root / f"{_TMP_PREFIX}replaced_{final.name}"
    if final.exists():  # re-saving a step (e.g. after a resume at that step)
        os.rename(final, replaced)
    try:
        os.rename(tmp, final)
    except OSError:
        if replaced.exists():
            os.rename(replaced, final)
        raise
    _VERIFIED[str(final.resolve())] = (manifest.encode(), _fingerprint(final, files))
    try:
        shutil.rmtree(replaced, ignore_errors=True)
        _prune(root, step, keep_last)
    except OSError as err:  # the checkpoint is in place; leftovers are only disk space
        logger.warning("checkpoint %s saved, but removing old ones failed: %s", final, err)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module,
                    optimizer: StudentOptimizer, trainer_state: dict[str, Any],
                    meta: dict[str, Any], *, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it); return its path.

    ``trainer_state`` is this rank's picklable state (RNG, data position, replay buffer, ...);
    ``meta`` is JSON-serialisable run information, identical on every rank.

    Raises:
        CheckpointSaveError: on every rank when any rank's part failed; its message starts
            "no space left on <root> while saving step <N>" for a full disk or quota. The
            ``.tmp_`` directory is removed and the previous checkpoints are untouched.
    """
    root = Path(root)
    final, tmp = root / _name(step), root / f"{_TMP_PREFIX}{_name(step)}"

    def prepare() -> None:
        if _rank() == 0:
            if tmp.exists():  # a previous save of this step crashed half-way
                shutil.rmtree(tmp)
            for sub in ("model", "optimizer", "trainer"):
                (tmp / sub).mkdir(parents=True)

    def write() -> None:
        save_model_checkpoint(model, tmp / "model")
        dist_checkpointing.save(optimizer.sharded_state_dict(model), str(tmp / "optimizer"))
        torch.save(trainer_state, tmp / "trainer" / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))

    with preemption_signals_blocked():
        try:
            _on_all_ranks(step, root, prepare)
            _on_all_ranks(step, root, write)
            listing = _on_all_ranks(step, root, lambda: _list_files(tmp) if _rank() == 0
                                    else None)[0]
            shares = _on_all_ranks(step, root, lambda: _hash_files(tmp, _my_share(listing)))
            _on_all_ranks(step, root, lambda: _publish(root, tmp, final, step, shares,
                                                       keep_last) if _rank() == 0 else None)
        except CheckpointSaveError as err:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                logger.error("%s", err)
            _barrier()
            raise
    logger.info("saved checkpoint %s", final)
    return final


# ------------------------------------------------------------------ loading

def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    build_optimizer: Callable[[torch.nn.Module], StudentOptimizer]
                    ) -> tuple[torch.nn.Module, StudentOptimizer, dict[str, Any], dict[str, Any]]:
    """Load checkpoint ``path`` into a freshly built, *unquantized* ``model`` (collective).

    The checkpoint is verified first (not again if this process just did, e.g. in
    :func:`latest_checkpoint`). ``build_optimizer(model)`` makes the optimizer once the model
    (with its quantizers) is restored. Returns ``(model, optimizer, this rank's trainer_state,
    meta)``; the caller restores RNG and data state from ``trainer_state``.

    Raises:
        DamagedCheckpointError: a file is missing, of another size or content than saved.
    """
    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise DamagedCheckpointError(path, problems)
    meta = json.loads((path / "meta.json").read_text())
    world = _world()
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
