"""The demo's files, made once and cached: ``prepare_demo(workdir) -> DemoAssets``.

Everything lives under ``workdir/demo-<key>/``, where ``key`` hashes the task and teacher configs
with :data:`~nemo_opd.demo.task.TASK_VERSION` and :data:`~nemo_opd.demo.teacher.TRAINER_VERSION`:
a change to any of them selects a new directory, so a stale cache is never used. A directory is
complete only once its ``READY`` marker exists; it is built under a temporary name and renamed,
so an interrupted build leaves nothing that looks finished.

The teacher comes from, in order: the cache; the copy shipped in ``nemo_opd/demo/assets/teacher``
when its recorded key matches (made by ``python -m nemo_opd.demo.teacher OUT --ship``, the same
training code); otherwise it is trained here (minutes on a CPU, with progress logged).

The student starts from the teacher's own weights (``student_dir == teacher_dir``): the demo is
quantization-aware self-distillation (seed 003 §4), where the full-precision model teaches its
own 4-bit copy, so every accuracy point the student lacks is one quantization took away.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from nemo_opd.demo.task import (
    TASK_VERSION,
    AdditionTask,
    choice_records,
    generate_records,
    train_records,
    write_jsonl,
)
from nemo_opd.demo.teacher import TRAINER_VERSION, TeacherConfig, TeacherRun, train_teacher

__all__ = ["DemoAssets", "SHIPPED_TEACHER", "cache_key", "prepare_demo", "record_teacher",
           "ship_teacher"]

logger = logging.getLogger(__name__)

SHIPPED_TEACHER = Path(__file__).parent / "assets" / "teacher"
"""The teacher trained by ``python -m nemo_opd.demo.teacher OUT --ship`` (weights in bf16)."""

_KEY_FILE = "nemo_opd_demo.json"
_READY = "READY"


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Paths of the demo's cached files."""

    root: Path
    """The cache directory ``workdir/demo-<key>``."""
    teacher_dir: Path
    """HF model directory of the teacher, tokenizer included."""
    student_dir: Path
    """HF model directory the student is initialised from (the teacher's: self-distillation)."""
    train_file: Path
    """jsonl of ``{"prompt", "response"}`` training problems."""
    eval_tasks: dict[str, Path]
    """Local eval task name → jsonl: ``arith_gen`` (``{"question", "answer"}``, exact match)
    and ``arith_mc`` (``{"query", "choices", "gold"}``), both on held-out problems."""
    task: AdditionTask
    """The task the files were generated from."""


def cache_key(task: AdditionTask, teacher: TeacherConfig) -> str:
    """12 hex digits identifying what the configs and code versions produce."""
    blob = json.dumps({"task_version": TASK_VERSION, "trainer_version": TRAINER_VERSION,
                       "task": dataclasses.asdict(task), "teacher": dataclasses.asdict(teacher)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _assets(root: Path, task: AdditionTask) -> DemoAssets:
    teacher = root / "teacher"
    return DemoAssets(root=root, teacher_dir=teacher, student_dir=teacher,
                      train_file=root / "train.jsonl",
                      eval_tasks={"arith_gen": root / "arith_gen.jsonl",
                                  "arith_mc": root / "arith_mc.jsonl"},
                      task=task)


def _shipped_key() -> str | None:
    meta = SHIPPED_TEACHER / _KEY_FILE
    return json.loads(meta.read_text())["key"] if meta.is_file() else None


def prepare_demo(workdir: str | Path, task: AdditionTask | None = None,
                 teacher: TeacherConfig | None = None) -> DemoAssets:
    """Return the demo's assets under ``workdir``, building whatever the cache lacks.

    Fast (file checks only) when the cache is complete; otherwise writes the data files
    (a second) and copies the shipped teacher or trains one (minutes). Safe to call from several
    processes: each builds in its own temporary directory and the first rename wins.
    """
    task = task or AdditionTask()
    teacher = teacher or TeacherConfig()
    key = cache_key(task, teacher)
    root = Path(workdir) / f"demo-{key}"
    assets = _assets(root, task)
    if (root / _READY).is_file():
        return assets
    build = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    built = _assets(build, task)
    write_jsonl(built.train_file, train_records(task))
    write_jsonl(built.eval_tasks["arith_gen"], generate_records(task))
    write_jsonl(built.eval_tasks["arith_mc"], choice_records(task))
    if _shipped_key() == key:
        logger.info("demo teacher: copying the shipped one from %s", SHIPPED_TEACHER)
        shutil.copytree(SHIPPED_TEACHER, built.teacher_dir)
    else:
        logger.info("demo teacher: no shipped teacher for key %s; training one (minutes)", key)
        record_teacher(built.teacher_dir, task, teacher)
    (build / _READY).write_text(key + "\n")
    try:
        build.rename(root)
    except OSError:  # another process finished first; its directory is as good as ours
        shutil.rmtree(build, ignore_errors=True)
        if not (root / _READY).is_file():
            raise
    logger.info("demo assets ready in %s", root)
    return assets


def record_teacher(model_dir: str | Path, task: AdditionTask,
                   teacher: TeacherConfig) -> TeacherRun:
    """:func:`~nemo_opd.demo.teacher.train_teacher`, then record its cache key and run stats in
    ``model_dir/nemo_opd_demo.json`` (what :func:`ship_teacher` and the cache check read)."""
    run = train_teacher(model_dir, task, teacher)
    (run.model_dir / _KEY_FILE).write_text(json.dumps(
        {"key": cache_key(task, teacher), "train_seconds": round(run.train_seconds, 1),
         "final_loss": round(run.final_loss, 4)}, indent=1) + "\n")
    return run


def ship_teacher(model_dir: str | Path, task: AdditionTask | None = None,
                 teacher: TeacherConfig | None = None) -> Path:
    """Copy a teacher trained with the default configs into :data:`SHIPPED_TEACHER`."""
    task, teacher = task or AdditionTask(), teacher or TeacherConfig()
    meta = Path(model_dir) / _KEY_FILE
    recorded = json.loads(meta.read_text())["key"] if meta.is_file() else None
    if recorded != cache_key(task, teacher):
        raise ValueError(f"{model_dir} was not trained with the default demo configs (key "
                         f"{recorded!r}, expected {cache_key(task, teacher)!r})")
    shutil.rmtree(SHIPPED_TEACHER, ignore_errors=True)
    shutil.copytree(model_dir, SHIPPED_TEACHER)
    return SHIPPED_TEACHER
