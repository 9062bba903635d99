"""The built-in demo: a synthetic addition task, its tiny teacher (trained once, cached or
shipped), and the measurements that show 4-bit PTQ losing accuracy on it.

``prepare_demo(workdir)`` returns :class:`DemoAssets` (teacher/student HF dirs, train jsonl, eval
jsonls); ``python -m nemo_opd.demo.teacher OUT [--ship]`` (re)trains the teacher;
``python -m nemo_opd.demo.measure WORKDIR`` prints teacher / PTQ / distilled accuracies.
"""

from nemo_opd.demo.assets import DemoAssets, cache_key, prepare_demo
from nemo_opd.demo.task import TASK_VERSION, AdditionTask
from nemo_opd.demo.teacher import TRAINER_VERSION, TeacherConfig, train_teacher

__all__ = [
    "TASK_VERSION",
    "TRAINER_VERSION",
    "AdditionTask",
    "DemoAssets",
    "TeacherConfig",
    "cache_key",
    "prepare_demo",
    "train_teacher",
]
