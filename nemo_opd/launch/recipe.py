"""NeMo-Run plumbing shared by the recipes in ``recipes/``: presets, help, checks, confirmation.

A recipe is a plain function whose parameters are config sections (frozen dataclasses such as
:class:`nemo_opd.config.QuantConfig`) and plain values. Its presets are NeMo-Run factories
returning ``run.Partial(recipe_fn, **sections)`` with every section a nested ``run.Config``
(:func:`config_tree`), so each dataclass field is a dotted command-line override
(``distill.beta=0.5``) and the dataclass checks run when NeMo-Run builds the task.

NeMo-Run parses the whole command line (:func:`recipe_main` runs ``run.cli.main``): ``--factory``,
``--yaml``, ``--to-yaml``/``--to-toml``/``--to-json``, ``--dryrun``, ``-v/--verbose``,
``--yes``, operators (``optim.lr*=2``), ``run.executor=...``, all as in NeMo-Run's own recipes.
On top of it, one thin layer:

- a tuple parser registered with NeMo-Run's type parser (it has none): ``[a,b]``, ``(a, b)``,
  ``['a','b']`` or a bare ``a``;
- errors name the closest preset or override key (:class:`RecipeError`, before anything runs);
- ``check(task_kwargs, executor)``, the recipe's own check of the built sections against the
  chosen executor (e.g. ranks vs TP × PP), runs before any job is submitted;
- ``--help`` lists the presets and every overridable field with its value and documentation;
- ``--dryrun`` with a SLURM executor writes the sbatch script it would submit
  (``$NEMO_OPD_SBATCH_OUT`` or ``<recipe>.sbatch``) instead of submitting;
- remote executors (SLURM, Docker) ask "Continue?" unless ``--yes``; a local run starts directly;
- NeMo-Run's resolved-arguments table is printed only with ``--verbose`` or a task's ``--dryrun``.
"""

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
from nemo_run.cli.cli_parser import CLIException, ParseError, parse_cli_args, type_parser
from nemo_run.config import get_type_namespace
from nemo_run.core.frontend.console.api import CONSOLE

__all__ = [
    "config_tree",
    "field_docs",
    "override_fields",
    "apply_overrides",
    "presets",
    "resolve_preset",
    "built_arguments",
    "render_sbatch",
    "recipe_main",
    "RecipeError",
]

_OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)\s*(?P<op>[-+*/|&]?=)")
_VERBOSE_FLAGS = ("-v", "--verbose")


class RecipeError(RunContextError):
    """Bad recipe input (preset, override key, layout): NeMo-Run prints ``Error: <message>``
    and exits 1, before anything is built or submitted."""


@type_parser.register_parser(tuple)
def _parse_tuple(value: str, annotation: Any) -> tuple:
    """``tuple[T, ...]`` from ``[a,b]``, ``(a, b)``, ``['a', 'b']`` or a bare ``a``: each item
    parsed as ``T`` by NeMo-Run. Quotes are optional (``[a.jsonl,b.jsonl]``); items are
    scalars, so a top-level comma always separates two."""
    text = value.strip()
    try:
        literal = ast.literal_eval(text)
        items = list(literal) if isinstance(literal, (list, tuple)) else [literal]
    except (ValueError, SyntaxError):
        inner = text[1:-1] if text[:1] in "[(" and text[-1:] in "])" else text
        items = [item.strip().strip("'\"") for item in inner.split(",") if item.strip()]
    item_type = (typing.get_args(annotation) or (Any,))[0]
    return tuple(type_parser.parse(str(item), item_type) for item in items)


@type_parser.register_parser(types.UnionType)
def _parse_union(value: str, annotation: Any) -> Any:
    """``X | None`` as NeMo-Run parses ``Optional[X]`` (it knows only ``typing.Union``)."""
    return type_parser.parse_union(value, annotation)


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
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name == "ctx":
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


def _check_keys(tree: fdl.Buildable, args: list[str]) -> None:
    """Refuse an override that is not ``key<op>value`` or whose key is not a leaf of ``tree``,
    naming the closest keys (NeMo-Run's own message names neither)."""
    fields = override_fields(tree)
    known = {f.key for f in fields}
    for arg in args:
        match = _OVERRIDE.match(arg)
        if match is None:
            raise RecipeError(f"cannot read {arg!r}: overrides look like key=value "
                              "(e.g. distill.beta=0.5, optim.lr*=2)")
        key = match["key"]
        if key in known:
            continue
        sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(key, sorted(known | sections), n=3, cutoff=0.6)
        close += [k for k in sorted(known) if k.rsplit(".", 1)[-1] == leaf and k not in close]
        hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
        raise RecipeError(f"unknown override key {key!r}{hint} (`--help` lists every key)")


def _cli_error(err: CLIException) -> RecipeError:
    """NeMo-Run's parse error as ``<argument>: <reason>`` (its own message nests the whole
    exception twice, with context dictionaries)."""
    inner = err
    while isinstance(inner.__cause__, CLIException):
        inner = inner.__cause__
    # NeMo-Run re-raises a ParseError with the argument in the `expected_type` slot.
    arg = err.expected_type if isinstance(err, ParseError) else err.arg
    reason = inner.reason if isinstance(inner, ParseError) else inner.args[0]
    return RecipeError(f"{arg}: {str(reason).split(' (Argument: ')[0]}")


def apply_overrides(tree: fdl.Buildable, args: list[str]) -> None:
    """Apply command-line overrides (``key=value``, ``key*=2``...) to ``tree`` in place,
    exactly as NeMo-Run parses them on the command line.

    Raises :class:`RecipeError` for an argument that is not an override, a key that is not a
    field of the tree (suggesting the closest keys), or a value NeMo-Run cannot parse as the
    field's type.
    """
    _check_keys(tree, args)
    try:
        parse_cli_args(tree, args)
    except CLIException as err:
        raise _cli_error(err) from err


def built_arguments(task: run.Partial) -> dict[str, Any]:
    """Every argument ``task`` would call its function with: built values (dataclass checks
    run here) and the function's defaults for the rest."""
    keywords = {k: v for k, v in fdl.build(task).keywords.items() if k != "ctx"}
    bound = inspect.signature(task.__fn_or_cls__).bind_partial(**keywords)
    bound.apply_defaults()
    bound.arguments.pop("ctx", None)
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


def _load_config_file(path: str) -> Any:
    """A ``--to-yaml``/``--to-toml``/``--to-json`` file as NeMo-Run reads it, with the two
    things its own export writes and its reader (0.11) refuses: the top-level ``_partial_``
    key (``No parameter named '_partial_'``) and empty strings (``key=`` is not an
    argument; ``key=""`` is)."""
    from nemo_run.cli.config import ConfigSerializer
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise RecipeError(f"--yaml {path}: no such file")
    try:
        data = ConfigSerializer().load_dict(Path(path))
    except Exception as err:  # noqa: BLE001 - YAML, TOML and JSON each raise their own
        raise RecipeError(f"--yaml {path}: cannot read it ({err})") from err
    return OmegaConf.create({k: _quote_empty(v) for k, v in data.items()
                             if k not in ("_partial_", "_target_")})


def _quote_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _quote_empty(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_quote_empty(v) for v in value]
    return '""' if value == "" else value


def _is_local(executor: run.Executor | None) -> bool:
    return executor is None or isinstance(executor, run.LocalExecutor)


@contextlib.contextmanager
def _console_quiet(quiet: bool) -> Iterator[None]:
    """Silence NeMo-Run's console (its dry-run table and launch banners), not the task's."""
    before = CONSOLE.quiet
    CONSOLE.quiet = quiet or before
    try:
        yield
    finally:
        CONSOLE.quiet = before


def recipe_main(fn: Callable, *, default_preset: Callable[[], run.Partial],
                check: Callable[[dict[str, Any], run.Executor | None], None],
                entrypoint_type: str = "task") -> None:
    """Run recipe ``fn`` from the command line (``python recipe.py`` / ``nemo run recipe.py``).

    Args:
        fn: the recipe function (parameters = config sections and plain values).
        default_preset: the factory used without ``--factory`` or ``--yaml``.
        check: ``check(built_kwargs, executor)`` raising ``ValueError`` when the built sections
            cannot run on ``executor`` (None: in-process); runs before submission.
        entrypoint_type: "task" (NeMo-Run runs ``fn`` on the executor) or "experiment" (``fn``
            runs here and takes the run context as ``ctx``, e.g. to launch an Experiment).
    """
    verbose = any(arg in _VERBOSE_FLAGS for arg in sys.argv[1:])

    class RecipeRunContext(RunContext):
        def parse_args(self, args: list[str], lazy: bool = False) -> list[str]:
            try:  # builds the executor: its own checks (container image, sizes) raise here
                return super().parse_args(args, lazy=lazy)
            except ValueError as err:
                raise RecipeError(_first_part(err)) from err

        def parse_fn(self, fn: Callable, args: list[str], **default_kwargs: Any) -> run.Partial:
            if self.load:
                raise RecipeError("--load is not implemented by NeMo-Run "
                                  f"{run.__version__}; export a config with --to-yaml FILE "
                                  "and pass it back with --yaml FILE")
            if isinstance(self.factory, str) and self.factory.isidentifier():
                resolve_preset(fn, self.factory, default_preset)  # unknown names, close ones
            _check_keys(default_preset(), args)
            if isinstance(self.yaml, str):
                self.yaml = _load_config_file(self.yaml)
            try:
                task = super().parse_fn(fn, args, **default_kwargs)
            except CLIException as err:
                raise _cli_error(err) from err
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
            return task

        def _execute_task(self, fn: Callable, task_args: list[str]) -> None:
            with _console_quiet(not (self.dryrun or verbose)):
                super()._execute_task(fn, task_args)

        def _execute_experiment(self, fn: Callable, experiment_args: list[str]) -> None:
            # An experiment's dry run is its own (a sweep lists its runs), not NeMo-Run's table.
            with _console_quiet(not verbose):
                super()._execute_experiment(fn, experiment_args)

        def _should_continue(self, skip_confirmation: bool) -> bool:
            # A local run starts at once; a job for a cluster or a container asks first.
            if _is_local(self.executor):
                return True
            with _console_quiet(False):
                return super()._should_continue(skip_confirmation)

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
            print("\nExecutors (run.executor=NAME run.executor.ARG=VALUE; default: this process;"
                  " others ask 'Continue?' unless --yes):")
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
                  "(key=value, key*=2, key+=1; lists as [a,b]):")
            print(_format_fields(tree))

    run.cli.main(fn, default_factory=default_preset, entrypoint_cls=RecipeEntrypoint,
                 run_ctx_cls=RecipeRunContext, type=entrypoint_type)
