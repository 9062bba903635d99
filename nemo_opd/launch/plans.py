"""The recipe's own config sections (beside :class:`nemo_opd.config.RunConfig`'s): what to
evaluate and what to export. Frozen dataclasses of plain types, so every field is a dotted
command-line override (``evaluation.limit=100``, ``export.dtype=float16``)."""


import dataclasses
import math

__all__ = ["DEMO", "EvalPlan", "ExportPlan"]

DEMO = "<demo>"
"""A model or data path with this value is filled from the built-in demo's cached assets."""

_EXPORT_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """lm-eval evaluation of teacher, PTQ, student and export (``nemo_opd.eval``)."""

    tasks: tuple[str, ...] = ("seed",)
    """Task or task-set names (``seed`` = HellaSwag, ARC-E, ARC-C, WinoGrande, MMLU; ``gsm8k``);
    empty = only the local tasks (the demo's)."""
    local_tasks: tuple[str, ...] = ()
    """Extra local jsonl tasks as ``name=path.jsonl`` (multiple-choice or generative records)."""
    data_dir: str = ""
    """Read benchmark data from this local directory instead of the hub ("" = hub/cache)."""
    limit: float | None = None
    """Documents per task (int) or fraction (< 1); None = all."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None = each task's default."""
    batch_size: int = 8
    """Requests per forward pass."""
    max_gen_toks: int = 32
    """Generation budget in tokens of the local generative tasks (an answer longer than this
    can never match)."""

    def __post_init__(self) -> None:
        for field in ("tasks", "local_tasks"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(t, str) and t for t in value):
                raise ValueError(f"EvalPlan.{field} must be a tuple of non-empty strings, "
                                 f"got {value!r}")
        for entry in self.local_tasks:
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"EvalPlan.local_tasks entries must be 'name=path.jsonl', "
                                 f"got {entry!r}")
        if self.limit is not None and (isinstance(self.limit, bool)
                                       or not isinstance(self.limit, (int, float))
                                       or not math.isfinite(self.limit) or self.limit <= 0):
            raise ValueError(f"EvalPlan.limit must be None or a number > 0, got {self.limit!r}")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int)
                                             or self.num_fewshot < 0):
            raise ValueError(f"EvalPlan.num_fewshot must be None or an int >= 0, "
                             f"got {self.num_fewshot!r}")
        for field in ("batch_size", "max_gen_toks"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"EvalPlan.{field} must be an int >= 1, "
                                 f"got {getattr(self, field)!r}")

    @property
    def local_task_files(self) -> dict[str, str]:
        """``{name: path}`` of :attr:`local_tasks`."""
        return dict(entry.split("=", 1) for entry in self.local_tasks)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """The deployable artifact: a ModelOpt unified HF checkpoint (``hf_quant_config.json``)
    that TensorRT-LLM loads with ``LLM(model=dir)``; for a full-precision student
    (``quant.format=none``) a plain HF checkpoint of ``dtype``."""

    enabled: bool = True
    """Export the trained student (needs TP = PP = 1; a larger layout skips it with a note)."""
    dir: str = ""
    """Where; "" = ``<output_dir>/export``."""
    dtype: str = "bfloat16"
    """dtype of the unquantized tensors (embeddings, norms, output layer; every tensor of a
    full-precision student)."""
    evaluate: bool = True
    """Evaluate the export through lm-eval's HF model on its dequantised weights."""

    def __post_init__(self) -> None:
        for field in ("enabled", "evaluate"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"ExportPlan.{field} must be a bool, "
                                 f"got {getattr(self, field)!r}")
        if self.dtype not in _EXPORT_DTYPES:
            raise ValueError(f"ExportPlan.dtype must be one of {_EXPORT_DTYPES}, "
                             f"got {self.dtype!r}")
