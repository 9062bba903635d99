"""The demo's files, made once and cached: ``prepare_demo(workdir) -> DemoAssets``.

Everything lives under ``workdir/<task>-<key>/`` (``demo-`` for the built-in addition task,
``chain-`` for :class:`~nemo_opd.demo.chain.ChainSumTask`), where ``key`` hashes the task and
model configs with :data:`~nemo_opd.demo.task.TASK_VERSION` and
:data:`~nemo_opd.demo.teacher.TRAINER_VERSION`: a change to any of them selects a new directory,
so a stale cache is never used. A directory is complete only once its ``READY`` marker exists;
it is built under a temporary name and renamed, so an interrupted build leaves nothing that
looks finished.

Each model (the teacher, and a separate student when one is configured) comes from, in order:
the cache; a copy shipped in ``nemo_opd/demo/assets`` whose recorded key matches (made by
``python -m nemo_opd.demo.teacher OUT --ship``, the same training code); otherwise it is trained
here (minutes on a CPU, with progress logged); a :class:`~nemo_opd.demo.teacher.FineTuned`
student is fine-tuned from the set's teacher, and its key includes the teacher's. Shipped: the
demo teacher, finding 2's chain-sum teacher and weak student, finding 3c's fine-tuned demo
teacher.

Without a student config the student starts from the teacher's own weights
(``student_dir == teacher_dir``): the demo is quantization-aware self-distillation (seed 003
§4), where the full-precision model teaches its own 4-bit copy, so every accuracy point the
student lacks is one quantization took away. With one (size distillation, finding 2 of
``docs/reproduction.md``) the student is a smaller model trained on the same data for fewer
steps; or (finding 3c) the teacher fine-tuned on other data, whose eval tasks join the set's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from nemo_opd.demo.task import TASK_VERSION, AdditionTask, write_jsonl
from nemo_opd.demo.teacher import (
    TRAINER_VERSION,
    DemoTask,
    FineTuned,
    TeacherConfig,
    TeacherRun,
    train_teacher,
)

__all__ = ["DemoAssets", "DemoTask", "SHIPPED_TEACHER", "cache_key", "demo_root", "prepare_demo",
           "model_key", "record_teacher", "ship_teacher", "shipped_copy"]

logger = logging.getLogger(__name__)

_SHIPPED = Path(__file__).parent / "assets"

SHIPPED_TEACHER = _SHIPPED / "teacher"
"""The teacher trained by ``python -m nemo_opd.demo.teacher OUT --ship`` (weights in bf16)."""

_KEY_FILE = "nemo_opd_demo.json"
_READY = "READY"


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Paths of the demo's cached files."""

    root: Path
    """The cache directory ``workdir/<task>-<key>``."""
    teacher_dir: Path
    """HF model directory of the teacher, tokenizer included."""
    student_dir: Path
    """HF model directory the student is initialised from (the teacher's without a student
    config: self-distillation)."""
    train_file: Path
    """jsonl of ``{"prompt", "response"}`` training problems."""
    eval_tasks: dict[str, Path]
    """Local eval task name → jsonl, on held-out problems: for the addition task ``arith_gen``
    (``{"question", "answer"}``, exact match) and ``arith_mc`` (``{"query", "choices",
    "gold"}``); for the chain task ``chain_gen``; a fine-tuned student's task adds its own
    (``sub_gen``)."""
    task: DemoTask
    """The task the files were generated from."""


def _task_name(task: DemoTask) -> str:
    return "demo" if isinstance(task, AdditionTask) else "chain"


Student = TeacherConfig | FineTuned
"""A separate student: trained on the set's task from scratch, or fine-tuned from its teacher."""


def cache_key(task: DemoTask, teacher: TeacherConfig, student: Student | None = None) -> str:
    """12 hex digits identifying what the configs and code versions produce (a model
    directory's own key is ``cache_key(task, its config)``)."""
    configs = {"task_version": TASK_VERSION, "trainer_version": TRAINER_VERSION,
               "task": dataclasses.asdict(task), "teacher": dataclasses.asdict(teacher)}
    if student is not None:
        configs["student"] = dataclasses.asdict(student)
    blob = json.dumps(configs, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_key(task: DemoTask, cfg: TeacherConfig, init_key: str | None = None) -> str:
    """A model directory's own key: ``cache_key(task, cfg)``, combined for a fine-tuned model
    with ``init_key``, the key of the model it started from."""
    key = cache_key(task, cfg)
    if init_key is None:
        return key
    return hashlib.sha256(f"{key}:{init_key}".encode()).hexdigest()[:12]


def shipped_copy(task: DemoTask, cfg: TeacherConfig, init_key: str | None = None
                 ) -> Path | None:
    """The model directory shipped in ``nemo_opd/demo/assets`` whose recorded key is
    :func:`model_key` ``(task, cfg, init_key)``, or None (then :func:`prepare_demo` trains
    it)."""
    key = model_key(task, cfg, init_key)
    return next((meta.parent for meta in sorted(_SHIPPED.rglob(_KEY_FILE))
                 if _recorded_key(meta.parent) == key), None)


def _eval_tasks(task: DemoTask, student: Student | None) -> tuple[str, ...]:
    """The set's eval task names: the task's, then a fine-tuned student's new ones."""
    names = task.EVAL_TASKS + (student.task.EVAL_TASKS if isinstance(student, FineTuned) else ())
    return tuple(dict.fromkeys(names))


def _eval_records(task: DemoTask, student: Student | None) -> dict[str, list[dict]]:
    extra = student.task.eval_records() if isinstance(student, FineTuned) else {}
    return {**extra, **task.eval_records()}


def _assets(root: Path, task: DemoTask, student: Student | None) -> DemoAssets:
    teacher = root / "teacher"
    return DemoAssets(root=root, teacher_dir=teacher,
                      student_dir=teacher if student is None else root / "student",
                      train_file=root / "train.jsonl",
                      eval_tasks={name: root / f"{name}.jsonl"
                                  for name in _eval_tasks(task, student)},
                      task=task)


def _recorded_key(model_dir: Path) -> str | None:
    meta = model_dir / _KEY_FILE
    return json.loads(meta.read_text())["key"] if meta.is_file() else None


def _build_model(target: Path, task: DemoTask, cfg: TeacherConfig, role: str,
                 init_dir: Path | None = None) -> None:
    init_key = None if init_dir is None else _recorded_key(init_dir)
    shipped = shipped_copy(task, cfg, init_key)
    if shipped is not None:
        logger.info("demo %s: copying the shipped one from %s", role, shipped)
        shutil.copytree(shipped, target)
    else:
        how = "training one" if init_dir is None else f"fine-tuning one from the {init_dir.name}"
        logger.info("demo %s: no shipped copy for key %s; %s (minutes)", role,
                    model_key(task, cfg, init_key), how)
        record_teacher(target, task, cfg, init_dir=init_dir)


def demo_root(workdir: str | Path, task: DemoTask | None = None,
              teacher: TeacherConfig | None = None, student: Student | None = None) -> Path:
    """The directory :func:`prepare_demo` uses for these configs (nothing is built)."""
    task = task or AdditionTask()
    key = cache_key(task, teacher or TeacherConfig(), student)
    return Path(workdir) / f"{_task_name(task)}-{key}"


def prepare_demo(workdir: str | Path, task: DemoTask | None = None,
                 teacher: TeacherConfig | None = None,
                 student: Student | None = None) -> DemoAssets:
    """Return the assets of ``task`` under ``workdir``, building whatever the cache lacks.

    Fast (file checks only) when the cache is complete; otherwise writes the data files
    (seconds) and copies the shipped models or trains them (minutes). ``student``: the config of
    a separate student model trained on the same data, or fine-tuned from the teacher
    (:class:`~nemo_opd.demo.teacher.FineTuned`); None = the student is the teacher. Safe
    to call from several processes: each builds in its own temporary directory and the first
    rename wins.
    """
    task = task or AdditionTask()
    teacher = teacher or TeacherConfig()
    key = cache_key(task, teacher, student)
    root = demo_root(workdir, task, teacher, student)
    assets = _assets(root, task, student)
    if (root / _READY).is_file():
        return assets
    build = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    built = _assets(build, task, student)
    write_jsonl(built.train_file, task.train_records())
    for name, records in _eval_records(task, student).items():
        write_jsonl(built.eval_tasks[name], records)
    _build_model(built.teacher_dir, task, teacher, "teacher")
    if isinstance(student, FineTuned):
        _build_model(built.student_dir, student.task, student.cfg, "student",
                     init_dir=built.teacher_dir)
    elif student is not None:
        _build_model(built.student_dir, task, student, "student")
    (build / _READY).write_text(key + "\n")
    try:
        build.rename(root)
    except OSError:  # another process finished first; its directory is as good as ours
        shutil.rmtree(build, ignore_errors=True)
        if not (root / _READY).is_file():
            raise
    logger.info("demo assets ready in %s", root)
    return assets


def record_teacher(model_dir: str | Path, task: DemoTask, teacher: TeacherConfig,
                   init_dir: str | Path | None = None) -> TeacherRun:
    """:func:`~nemo_opd.demo.teacher.train_teacher` (from ``init_dir``'s weights if given), then
    record its cache key and run stats in ``model_dir/nemo_opd_demo.json`` (what
    :func:`ship_teacher` and the cache check read). A fine-tuned model's key includes the key of
    the model it started from."""
    run = train_teacher(model_dir, task, teacher, init_dir=init_dir)
    key = model_key(task, teacher, None if init_dir is None else _recorded_key(Path(init_dir)))
    (run.model_dir / _KEY_FILE).write_text(json.dumps(
        {"key": key, "train_seconds": round(run.train_seconds, 1),
         "final_loss": round(run.final_loss, 4)}, indent=1) + "\n")
    return run


def ship_teacher(model_dir: str | Path, task: DemoTask | None = None,
                 teacher: TeacherConfig | None = None, where: str = "teacher",
                 init_key: str | None = None) -> Path:
    """Copy a model trained with ``task`` and ``teacher`` (default: the demo's; fine-tuned from
    the model of key ``init_key``, if given) to ``nemo_opd/demo/assets/<where>``, where
    :func:`prepare_demo` finds it by its recorded key; refused when that key differs."""
    task, teacher = task or AdditionTask(), teacher or TeacherConfig()
    recorded, expected = _recorded_key(Path(model_dir)), model_key(task, teacher, init_key)
    if recorded != expected:
        raise ValueError(f"{model_dir} was not trained with these configs (key {recorded!r}, "
                         f"expected {expected!r})")
    shipped = _SHIPPED / where
    shutil.rmtree(shipped, ignore_errors=True)
    shutil.copytree(model_dir, shipped)
    return shipped
