"""The on-policy distillation trainer: step, loop, optimizer, checkpoint/resume, metrics.

:func:`run_distillation` is the recipe's entry point; :class:`PreemptionFlag` turns SLURM's
preemption signals into its ``should_stop``.
"""

from nemo_opd.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nemo_opd.train.loop import EvalHook, Trainer, TrainResult, run_distillation
from nemo_opd.train.optim import StudentOptimizer, build_optimizer, lr_scheduler
from nemo_opd.train.preemption import PreemptionFlag
from nemo_opd.train.setup import check_teacher_student_agreement
from nemo_opd.train.step import NonFiniteLossError, ScoreResult, score_batch

__all__ = [
    "EvalHook",
    "NonFiniteLossError",
    "PreemptionFlag",
    "ScoreResult",
    "StudentOptimizer",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "check_teacher_student_agreement",
    "latest_checkpoint",
    "lr_scheduler",
    "load_checkpoint",
    "run_distillation",
    "save_checkpoint",
    "score_batch",
]
