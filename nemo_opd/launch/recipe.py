"""NeMo-Run plumbing shared by the recipes in ``recipes/``: presets, overrides, help, checks.

A recipe is a plain function whose parameters are config sections (frozen dataclasses such as
:class:`nemo_opd.config.QuantConfig`) and plain values. Its presets are NeMo-Run factories
returning ``run.Partial(recipe_fn, **sections)`` with every section a nested ``run.Config``
(:func:`config_tree`), so each dataclass field is a dotted command-line override
(``distill.beta=0.5``) and the dataclass checks run when NeMo-Run builds the task.
:func:`recipe_main` runs a recipe through ``run.cli.main`` with:

- ``--factory/-f PRESET`` chooses a preset (default: the recipe's default preset); an unknown
  preset or override key fails before anything runs, naming the closest valid ones;
- ``key=value`` overrides are parsed here by each field's type annotation
  (:func:`apply_overrides`): NeMo-Run 0.11's parser rejects ``from __future__ import
  annotations`` strings; its own ``run.*`` arguments (executor, plugins) stay with it;
- ``--help`` lists the presets and every overridable field with its value and documentation;
- ``check(task_kwargs, executor)``, the recipe's own check of the built sections against the
  chosen executor (e.g. ranks vs TP × PP), runs before any job is submitted;
- ``--dryrun`` with a SLURM executor writes the sbatch script it would submit
  (``$NEMO_OPD_SBATCH_OUT`` or ``<recipe>.sbatch``) instead of submitting.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fiddle as fdl
import nemo_run as run
import typer
from nemo_run.cli.api import Entrypoint, RunContext, RunContextError
from nemo_run.config import get_type_namespace

__all__ = [
    "config_tree",
    "field_docs",
    "override_fields",
    "apply_overrides",
    "parse_value",
    "presets",
    "resolve_preset",
    "built_arguments",
    "render_sbatch",
    "recipe_main",
    "RecipeError",
]

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class RecipeError(RunContextError):
    """Bad recipe input (preset, override key, layout): NeMo-Run prints ``Error: <message>``
    and exits 1, before anything is built or submitted."""


def config_tree(value: Any) -> Any:
    """``value`` with every dataclass instance (nested ones too) turned into a ``run.Config``
    of the same class and field values, so each field can be overridden by its dotted path."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return run.Config(type(value), **{f.name: config_tree(getattr(value, f.name))
                                          for f in dataclasses.fields(value) if f.init})
    return value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for a dataclass whose fields are documented PEP 257 style (a
    string literal right under the annotated assignment), read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class OverrideField:
    """One overridable leaf of a recipe's config tree."""

    key: str
    """Dotted path (``distill.beta``)."""
    value: Any
    """Its value in the preset."""
    doc: str
    """The field's docstring ("" when it has none)."""


def _arguments(node: fdl.Buildable) -> Iterator[tuple[str, Any]]:
    """(name, value) of every parameter of ``node``'s target: set ones, then defaults."""
    for name, param in inspect.signature(node.__fn_or_cls__).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in node.__arguments__:
            yield name, node.__arguments__[name]
        elif param.default is not param.empty:
            yield name, param.default


def override_fields(tree: fdl.Buildable, prefix: str = "") -> list[OverrideField]:
    """Every leaf of ``tree`` (a preset's ``run.Partial``) as an :class:`OverrideField`."""
    target = tree.__fn_or_cls__
    docs = field_docs(target) if isinstance(target, type) else {}
    fields = []
    for name, value in _arguments(tree):
        key = f"{prefix}{name}"
        if isinstance(value, fdl.Buildable):
            fields += override_fields(value, key + ".")
        else:
            fields.append(OverrideField(key, value, docs.get(name, "")))
    return fields


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected a bool (true/false), got {text!r}")


def _split_items(text: str) -> list[str]:
    """Top-level comma-separated items of ``[a,b]`` / ``(a,b)`` / ``a,b``; commas inside
    nested brackets stay in their item (``[x=[1,2],y=3]`` -> ``x=[1,2]``, ``y=3``)."""
    inner = text.strip()
    if inner[:1] in ("[", "(") and inner[-1:] in ("]", ")"):
        inner = inner[1:-1]
    items, depth, current = [], 0, ""
    for char in inner:
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item.strip() for item in [*items, current] if item.strip()]


def parse_value(text: str, annotation: Any) -> Any:
    """``text`` (as typed on the command line) as a value of type ``annotation``: bool
    (true/false), int, float, str (quotes optional), ``X | None`` (None/null), ``Literal``,
    ``tuple[T, ...]`` / ``list[T]`` (``[a,b]``, ``(a,b)`` or ``a,b``); anything else as a
    Python literal. Raises ``ValueError`` when it does not fit."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.strip() in ("None", "none", "null") and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arm)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        value = text.strip().strip("'\"")
        if value not in [str(a) for a in args]:
            raise ValueError(f"expected one of {args}, got {text!r}")
        return next(a for a in args if str(a) == value)
    if origin in (tuple, list):
        item_type = args[0] if args else Any
        items = tuple(parse_value(item, item_type) for item in _split_items(text))
        return items if origin is tuple else list(items)
    if annotation is bool:
        return _parse_bool(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if annotation is str:
        stripped = text.strip()
        quoted = len(stripped) > 1 and stripped[0] == stripped[-1] and stripped[0] in "'\""
        return stripped[1:-1] if quoted else text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _type_hints(target: Any) -> dict[str, Any]:
    # Resolves `from __future__ import annotations` strings, which NeMo-Run 0.11's own parser
    # leaves as str and then rejects ("Unsupported type: float").
    hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    hints.pop("return", None)
    return hints


def _unknown_key(key: str, tree: fdl.Buildable) -> RecipeError:
    known = {f.key for f in override_fields(tree)}
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, sorted(known | sections), n=3, cutoff=0.6)
    close += [k for k in sorted(known) if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
    return RecipeError(f"unknown override key {key!r}{hint} (`--help` lists every key)")


def apply_overrides(tree: fdl.Buildable, args: list[str]) -> None:
    """Set ``key=value`` overrides on ``tree`` in place, each value parsed as the field's
    annotated type (:func:`parse_value`).

    Raises :class:`RecipeError` for an argument that is not ``key=value``, a key that is not a
    field of the tree (suggesting the closest keys), or a value of the wrong type.
    """
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not _KEY.match(key):
            raise RecipeError(f"cannot read {arg!r}: overrides look like key=value "
                              "(e.g. distill.beta=0.5)")
        *path, name = key.split(".")
        node = tree
        for part in path:
            node = node.__arguments__.get(part) if isinstance(node, fdl.Buildable) else None
            if not isinstance(node, fdl.Buildable):
                raise _unknown_key(key, tree)
        hints = _type_hints(node.__fn_or_cls__)
        if name not in hints or isinstance(node.__arguments__.get(name), fdl.Buildable):
            raise _unknown_key(key, tree)
        try:
            setattr(node, name, parse_value(text, hints[name]))
        except ValueError as err:
            raise RecipeError(f"{key}={text!r}: {err}") from err


def built_arguments(task: run.Partial) -> dict[str, Any]:
    """Every argument ``task`` would call its function with: built values (dataclass checks
    run here) and the function's defaults for the rest."""
    bound = inspect.signature(task.__fn_or_cls__).bind_partial(**fdl.build(task).keywords)
    bound.apply_defaults()
    return dict(bound.arguments)


def render_sbatch(task: run.Partial, executor: run.SlurmExecutor, name: str) -> tuple[str, Path]:
    """``(script, experiment_dir)``: the sbatch script NeMo-Run would submit for ``task`` on
    ``executor``, from its dry run (quiet, nothing submitted), and the local experiment
    directory that dry run left: the job's serialized configs (``*/configs``), which a real
    launch copies to ``executor.job_dir``."""
    with contextlib.redirect_stdout(io.StringIO()), \
            run.Experiment(name, executor=executor, log_level="ERROR") as experiment:
        experiment.add(task, executor=executor, name=name)
        experiment.dryrun(log=False, delete_exp_dir=False)
        # NeMo-Run keeps the scheduler request of a dry run on the job; materialize() is the
        # text `sbatch` would receive.
        script = experiment.jobs[0]._dryrun_info.request.materialize()
        return script, Path(experiment._exp_dir)


def _first_part(err: Exception) -> str:
    # Fiddle appends the whole call it failed to build to the message; the first part is ours.
    return str(err).split("\n\nFiddle context")[0]


def _preset_name_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-f", "--factory") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--factory="):
            return arg.split("=", 1)[1]
    return None


def presets(fn: Callable) -> dict[str, Callable[[], run.Partial]]:
    """The recipe's presets: NeMo-Run factories registered with ``target=fn``."""
    return {f.__name__: f for f in run.cli.list_factories(get_type_namespace(fn))}


def resolve_preset(fn: Callable, name: str | Callable | None, default: Callable) -> run.Partial:
    """The preset's task tree; an unknown name raises with the closest preset names."""
    if name is None:
        return default()
    if callable(name):
        return name()
    known = presets(fn)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"unknown preset {name!r}{hint} (presets: {', '.join(sorted(known))})")
    return known[name]()


def _format_fields(tree: run.Partial) -> str:
    lines = []
    for field in override_fields(tree):
        lines.append(f"  {field.key} = {field.value!r}")
        if field.doc:
            lines += textwrap.wrap(field.doc, width=96, initial_indent="      ",
                                   subsequent_indent="      ")
    return "\n".join(lines)


def recipe_main(fn: Callable, *, default_preset: Callable[[], run.Partial],
                check: Callable[[dict[str, Any], run.Executor | None], None],
                entrypoint_type: str = "task") -> None:
    """Run recipe ``fn`` from the command line (``python recipe.py`` / ``nemo run recipe.py``).

    Args:
        fn: the recipe function (parameters = config sections and plain values).
        default_preset: the factory used without ``--factory``.
        check: ``check(built_kwargs, executor)`` raising ``ValueError`` when the built sections
            cannot run on ``executor`` (None: in-process); runs before submission.
        entrypoint_type: "task" (NeMo-Run runs ``fn`` on the executor) or "experiment" (``fn``
            runs here and takes the run context as ``ctx``, e.g. to launch an Experiment).
    """

    class RecipeRunContext(RunContext):
        def parse_args(self, args: list[str], lazy: bool = False) -> list[str]:
            try:  # builds the executor: its own checks (container image, sizes) raise here
                return super().parse_args(args, lazy=lazy)
            except ValueError as err:
                raise RecipeError(_first_part(err)) from err

        def parse_fn(self, fn: Callable, args: list[str], **default_kwargs: Any) -> run.Partial:
            # NeMo-Run parses no recipe argument (see _type_hints): it has handled run.* and
            # the preset is resolved here; the overrides are applied by apply_overrides.
            task = resolve_preset(fn, self.factory, default_preset)
            apply_overrides(task, args)
            try:
                check(built_arguments(task), self.executor)
            except (ValueError, TypeError) as err:
                raise RecipeError(_first_part(err)) from err
            if self.dryrun and isinstance(self.executor, run.SlurmExecutor):
                out = Path(os.environ.get("NEMO_OPD_SBATCH_OUT", f"{fn.__name__}.sbatch"))
                script, experiment_dir = render_sbatch(task, self.executor, self.name)
                out.write_text(script)
                print(f"sbatch script written to {out} (not submitted: --dryrun); the job's "
                      f"configs are in {experiment_dir}")
            for name, value in default_kwargs.items():  # the experiment's `ctx`
                setattr(task, name, value)
            return task

    class RecipeEntrypoint(Entrypoint):
        def main(self, cmd_defaults: dict[str, Any] | None = None) -> None:
            # NeMo-Run's main() runs the app with standalone_mode=False and drops its exit
            # code, so a refused run would exit 0; pass the code on.
            app = typer.Typer(help=self.help_str, pretty_exceptions_enable=False)
            self._add_command(app, is_main=True, cmd_defaults=cmd_defaults)
            code = app(standalone_mode=False)
            if isinstance(code, int) and code:
                sys.exit(code)

        def help(self, console: Any = None, with_docs: bool = True) -> None:
            # Replaces NeMo-Run's argument table: it lists only the top-level sections.
            name = _preset_name_from_argv(sys.argv)
            known = presets(self.fn)
            print("\nPresets (--factory NAME): " + ", ".join(
                f"{n}{' (default)' if f.__name__ == default_preset.__name__ else ''}"
                for n, f in sorted(known.items())))
            print("\nExecutors (run.executor=NAME run.executor.ARG=VALUE; default: this process):")
            for factory in run.cli.list_factories(run.Executor):
                builder = factory().__fn_or_cls__
                print(f"  {factory.__name__}: "
                      + ", ".join(inspect.signature(builder).parameters))
            try:
                tree = resolve_preset(self.fn, name, default_preset)
            except RecipeError as err:
                print(f"\n{err}")
                return
            print(f"\nOverridable fields of preset {name or default_preset.__name__} "
                  "(key=value; lists as [a,b]):")
            print(_format_fields(tree))

    # The task runs in this process unless run.executor=... says otherwise; asking for a
    # confirmation there would only stall scripted runs.
    run.cli.main(fn, default_factory=default_preset, entrypoint_cls=RecipeEntrypoint,
                 run_ctx_cls=RecipeRunContext, type=entrypoint_type,
                 cmd_defaults={"skip_confirmation": True})
