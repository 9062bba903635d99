"""Evaluation tasks by name: the seeds' benchmark set, GSM8K, and local jsonl tasks.

Names a user can pass (:func:`resolve_tasks`):

* a task set — ``seed`` (HellaSwag, ARC-Easy, ARC-Challenge, WinoGrande, MMLU: the seeds'
  tables) or ``gsm8k`` (the size-distillation report);
* one of those benchmarks by its lm-eval name (:data:`HUB_TASKS`);
* a local task (:class:`LocalTask`): a jsonl of ``{"query": str, "choices": [str], "gold": int}``
  records (multiple choice, scored by log-likelihood, accuracy) or of
  ``{"question": str, "answer": str}`` records (greedy generation, exact match).

Benchmarks come from lm-eval's own task YAMLs. By default their data comes from the Hugging Face
hub (or its local cache, ``HF_DATASETS_OFFLINE=1``); with ``data_dir`` every split is read from
``<data_dir>/<dataset_path>/<dataset_name or "default">/<split>.jsonl`` instead — the layout
``datasets.load_dataset(path, name, split=split).to_json(file)`` writes on a machine with hub
access — so the seeds' suite runs on an air-gapped cluster.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "HUB_TASKS",
    "TASK_SETS",
    "HubTask",
    "LocalTask",
    "ResolvedTask",
    "hub_data_file",
    "load_tasks",
    "resolve_tasks",
    "task_manager",
]

LOCAL_TASK_KINDS = ("multiple_choice", "generate")


@dataclasses.dataclass(frozen=True)
class HubTask:
    """An lm-eval benchmark (task or group) and how the results table reports it."""

    name: str
    """lm-eval task or group name."""

    label: str
    """Column header in results tables."""

    metric: str
    """lm-eval metric key ``"<metric>,<filter>"`` reported for it (mean over documents; a
    group's leaf tasks are weighted by their document counts, as lm-eval's MMLU group is)."""

    yaml_dir: str
    """Folder under ``lm_eval/tasks`` holding its YAMLs (indexing only that folder takes
    milliseconds; lm-eval's whole index takes tens of seconds)."""


HUB_TASKS: dict[str, HubTask] = {t.name: t for t in (
    HubTask("hellaswag", "HellaSwag", "acc_norm,none", "hellaswag"),
    HubTask("arc_easy", "ARC-E", "acc_norm,none", "arc"),
    HubTask("arc_challenge", "ARC-C", "acc_norm,none", "arc"),
    HubTask("winogrande", "WinoGr", "acc,none", "winogrande"),
    HubTask("mmlu", "MMLU", "acc,none", "mmlu/default"),
    HubTask("gsm8k", "GSM8K", "exact_match,flexible-extract", "gsm8k"),
)}
"""The benchmarks of the seeds' tables, by lm-eval name."""

TASK_SETS: dict[str, tuple[str, ...]] = {
    "seed": ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "mmlu"),
    "gsm8k": ("gsm8k",),
}
"""Named groups of :data:`HUB_TASKS` (a set named like a task means that task)."""


@dataclasses.dataclass(frozen=True)
class LocalTask:
    """A task read from a local jsonl file (no hub, no lm-eval YAML to write)."""

    name: str
    """Task name (results table column); letters, digits, ``_`` and ``-``."""

    path: Path
    """jsonl file: ``{"query", "choices", "gold"}`` records for ``multiple_choice``,
    ``{"question", "answer"}`` records for ``generate``."""

    kind: Literal["multiple_choice", "generate"]
    """``multiple_choice``: the choice with the highest log-likelihood after the query (metrics
    ``acc`` and the byte-length-normalised ``acc_norm``); ``generate``: greedy generation after
    the question, compared with the answer by exact match (surrounding whitespace ignored)."""

    until: tuple[str, ...] = ("\n",)
    """Stop strings for ``generate`` (EOS always stops)."""

    max_gen_toks: int = 32
    """Generation budget in tokens for ``generate``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"LocalTask.name must be letters, digits, '_' or '-', "
                             f"got {self.name!r}")
        if self.kind not in LOCAL_TASK_KINDS:
            raise ValueError(f"LocalTask.kind must be one of {LOCAL_TASK_KINDS}, got {self.kind!r}")
        if self.max_gen_toks < 1:
            raise ValueError(f"LocalTask.max_gen_toks must be >= 1, got {self.max_gen_toks!r}")

    @property
    def metric(self) -> str:
        return "acc,none" if self.kind == "multiple_choice" else "exact_match,none"

    @classmethod
    def from_file(cls, name: str, path: str | Path, **kwargs: Any) -> LocalTask:
        """A local task whose kind is read from the first record's keys."""
        path = Path(path)
        first = _records(path)[0][1]
        kind = "multiple_choice" if "choices" in first else "generate"
        return cls(name, path, kind, **kwargs)

    def validate(self) -> int:
        """Check every record (file, line and field named on error); return the record count."""
        records = _records(self.path)
        for line, record in records:
            where = f"{self.path}:{line}"
            if self.kind == "multiple_choice":
                _require(record, {"query": str, "choices": list, "gold": int}, where)
                choices = record["choices"]
                if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                    raise ValueError(f"{where}: 'choices' must be a list of at least two "
                                     f"strings, got {choices!r}")
                if not 0 <= record["gold"] < len(choices):
                    raise ValueError(f"{where}: 'gold' = {record['gold']} is not an index into "
                                     f"its {len(choices)} choices")
            else:
                _require(record, {"question": str, "answer": str}, where)
        return len(records)

    def lm_eval_config(self) -> dict[str, Any]:
        """The lm-eval task config (what a task YAML would hold) reading :attr:`path`."""
        config: dict[str, Any] = {
            "task": self.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(self.path)}},
            "test_split": "test",
        }
        if self.kind == "multiple_choice":
            return config | {
                "output_type": "multiple_choice",
                "doc_to_text": "{{query}}",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")],
            }
        return config | {
            "output_type": "generate_until",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": list(self.until), "max_gen_toks": self.max_gen_toks,
                                  "do_sample": False},
            # Whitespace around the generation (the space after "answer:") is not an error.
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True,
                             "regexes_to_ignore": [r"^\s+", r"\s+$"]}],
        }


    def write_yaml(self, folder: str | Path) -> Path:
        """Write ``<folder>/<name>.yaml``, the task as lm-eval's ``--include_path`` reads it
        (:meth:`lm_eval_config` with the data path made absolute); returns its path."""
        import yaml  # a dependency of lm-eval

        config = self.lm_eval_config()
        config["dataset_kwargs"] = {"data_files": {"test": str(self.path.resolve())}}
        path = Path(folder) / f"{self.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path


@dataclasses.dataclass(frozen=True)
class ResolvedTask:
    """One results-table column: what lm-eval loads and which results make it up."""

    name: str
    label: str
    metric: str
    specs: tuple[str | dict[str, Any], ...]
    """Task names or config dicts for lm-eval's ``TaskManager.load``."""
    leaves: tuple[str, ...]
    """lm-eval leaf task names whose results (weighted by document count) form the column."""
    yaml_dir: str | None
    """lm-eval task folder to index (None for local tasks)."""


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"local task data {path} does not exist")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: each line must be a JSON object")
        records.append((line_no, record))
    if not records:
        raise ValueError(f"local task data {path} holds no records")
    return records


def _require(record: dict[str, Any], fields: dict[str, type], where: str) -> None:
    for field, kind in fields.items():
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r} (expected {sorted(fields)})")
        if not isinstance(record[field], kind) or isinstance(record[field], bool):
            raise ValueError(f"{where}: field {field!r} must be {kind.__name__}, "
                             f"got {type(record[field]).__name__}")


@cache
def task_manager(yaml_dirs: tuple[str, ...] = ()):
    """lm-eval ``TaskManager`` indexing only ``lm_eval/tasks/<dir>`` for each of ``yaml_dirs``."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False,
                       include_path=[str(root / d) for d in yaml_dirs] or None)


def _leaf_tasks(manager, name: str) -> list[str]:
    """Leaf task names of an lm-eval task, tag or group, from the index (nothing is built)."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index[name]
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind == Kind.GROUP:
        members = entry.cfg["task"]
        return [leaf for member in members
                for leaf in _leaf_tasks(manager, member if isinstance(member, str)
                                        else member["task"])]
    return [name]


def hub_data_file(data_dir: str | Path, config: Mapping[str, Any], split: str) -> Path:
    """Where ``data_dir`` holds ``split`` of a benchmark task's dataset."""
    return (Path(data_dir) / str(config["dataset_path"]) / str(config.get("dataset_name")
                                                               or "default") / f"{split}.jsonl")


_SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")


def _local_overrides(manager, leaf: str, data_dir: Path, num_fewshot: int | None) -> dict:
    """Config overrides pointing ``leaf`` at jsonl files under ``data_dir``.

    Splits whose file is absent are unset; the evaluated split (test, else validation) and,
    with few-shot examples, the few-shot source must exist.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(manager.task_index[leaf].yaml_path, resolve_func=False)
    files = {field: hub_data_file(data_dir, config, config[field])
             for field in _SPLIT_FIELDS if config.get(field)}
    required = ["test_split" if config.get("test_split") else "validation_split"]
    shots = num_fewshot if num_fewshot is not None else config.get("num_fewshot", 0)
    if shots:
        required.append(next(f for f in ("fewshot_split", "training_split", "validation_split")
                             if config.get(f)))
    missing = [str(files[f]) for f in required if not files[f].is_file()]
    if missing:
        raise FileNotFoundError(
            f"task {leaf!r}: missing local data {', '.join(missing)} (data_dir={data_dir}). "
            f"Write it where the hub is reachable with datasets.load_dataset("
            f"{config['dataset_path']!r}, {config.get('dataset_name')!r}, split=...)"
            ".to_json(file).")
    present = {f: path for f, path in files.items() if path.is_file()}
    return {
        "task": leaf,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {config[f]: str(p) for f, p in present.items()}},
        **{f: (config[f] if f in present else None) for f in _SPLIT_FIELDS if f in config},
    }


def _unknown(name: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown task {name!r}{hint} Known: {', '.join(sorted(known))}")


def resolve_tasks(tasks: Sequence[str], local_tasks: Mapping[str, str | Path | LocalTask]
                  | None = None, *, data_dir: str | Path | None = None,
                  num_fewshot: int | None = None) -> list[ResolvedTask]:
    """Expand task-set names, check every name and every data file, and say what lm-eval loads.

    Raises (before any model work):
        ValueError: an unknown name (with close matches), an empty list, a malformed local record.
        FileNotFoundError: a local task's file or a benchmark split under ``data_dir`` is
            missing; the message names the file.
    """
    local = {name: (task if isinstance(task, LocalTask) else LocalTask.from_file(name, task))
             for name, task in (local_tasks or {}).items()}
    for name, task in local.items():
        if task.name != name:
            raise ValueError(f"local_tasks key {name!r} differs from its task's name "
                             f"{task.name!r}")
    names: list[str] = []
    for name in tasks or list(local):
        expanded = TASK_SETS.get(name, (name,)) if name not in local else (name,)
        names += [n for n in expanded if n not in names]
    if not names:
        raise ValueError("no tasks to evaluate: pass task names or local tasks")
    known = sorted(set(TASK_SETS) | set(HUB_TASKS) | set(local))
    resolved = []
    for name in names:
        if name in local:
            task = local[name]
            task.validate()
            resolved.append(ResolvedTask(name, name, task.metric, (task.lm_eval_config(),),
                                         (name,), None))
            continue
        if name not in HUB_TASKS:
            raise _unknown(name, known)
        hub = HUB_TASKS[name]
        manager = task_manager((hub.yaml_dir,))
        leaves = tuple(_leaf_tasks(manager, name))
        specs: tuple[str | dict[str, Any], ...] = (name,)
        if data_dir is not None:
            specs = ({"group": f"nemo_opd_local_{name}",
                      "task": [_local_overrides(manager, leaf, Path(data_dir), num_fewshot)
                               for leaf in leaves]},)
        resolved.append(ResolvedTask(name, hub.label, hub.metric, specs, leaves, hub.yaml_dir))
    return resolved


def load_tasks(resolved: Sequence[ResolvedTask]) -> dict[str, Any]:
    """Build the lm-eval tasks (reading their data): lm-eval's ``TaskManager.load`` result,
    ``{"tasks": {name: Task}, "groups": ..., "group_map": ...}``.

    Raises:
        FileNotFoundError: a benchmark's dataset is neither on a reachable hub nor in the local
            ``datasets`` cache (the message says how to point the task at local files).
    """
    manager = task_manager(tuple(sorted({t.yaml_dir for t in resolved if t.yaml_dir})))
    loaded: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for task in resolved:
        try:
            part = manager.load(list(task.specs))
        except ConnectionError as err:  # datasets' hub errors (offline, unreachable, no cache)
            raise FileNotFoundError(
                f"task {task.name!r}: its dataset is neither reachable on the Hugging Face hub "
                f"nor in the local datasets cache ({err}). Pass data_dir (--data-dir) holding "
                "<data_dir>/<dataset_path>/<dataset_name or 'default'>/<split>.jsonl files") \
                from err
        for key in loaded:
            loaded[key].update(part.get(key, {}))
    return loaded
