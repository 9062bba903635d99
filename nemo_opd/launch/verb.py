"""The ``nemo run <recipe.py> [overrides]`` verb, added to NeMo-Run's ``nemo`` command.

NeMo-Run 0.11's ``nemo`` CLI has no verb that runs a script path. Packages extend that CLI
through the ``nemo_run.cli`` entry-point group: for every entry point NeMo-Run adds a
(placeholder) sub-command group of the same name, and when that name is the first argument it
imports the entry point's module and asks every registered :class:`nemo_run.cli.api.Entrypoint`
to attach itself (``Entrypoint.cli(parent)``, reached through ``run.cli.entrypoint(...,
entrypoint_cls=...)``). nemo_opd registers ``run = nemo_opd.launch.verb`` in that group
(``pyproject.toml``); importing this module registers :class:`ScriptVerb`, whose ``cli`` swaps
the empty ``run`` group for a command that executes the script.

The script replaces the ``nemo`` process (``os.execv``) with ``python <script> [args...]``, so
``nemo run recipes/x.py a=1`` behaves exactly like ``python recipes/x.py a=1``: the recipe's own
``run.cli.main`` parses the arguments, including ``--help``, ``--factory`` and
``run.executor=...``.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

import nemo_run as run
import typer

__all__ = ["VERB", "ScriptVerb", "resolve_recipe", "exec_recipe", "run_script"]

VERB = "run"
"""The sub-command name; must equal the entry-point name in ``pyproject.toml``."""

RECIPES_DIR = "recipes"
"""Where ``nemo run NAME`` looks for ``NAME.py`` when NAME is not a path."""

_USAGE = (f"usage: nemo {VERB} RECIPE.py [--help] [--factory PRESET] [key=value ...] "
          "[run.executor=FACTORY ...]")


def resolve_recipe(name: str, cwd: Path | None = None) -> Path:
    """The recipe file ``name`` refers to: a path to a ``.py`` file, or a recipe name looked
    up as ``recipes/<name>.py`` under ``cwd``. Raises ``FileNotFoundError`` listing the recipes
    that exist and the closest names."""
    cwd = Path.cwd() if cwd is None else cwd
    candidates = [Path(name), Path(RECIPES_DIR) / name, Path(RECIPES_DIR) / f"{name}.py"]
    for candidate in candidates:
        path = candidate if candidate.is_absolute() else cwd / candidate
        if path.is_file() and path.suffix == ".py":
            return path
    available = sorted(p.stem for p in (cwd / RECIPES_DIR).glob("*.py")
                       if not p.name.startswith("_"))
    close = difflib.get_close_matches(Path(name).stem, available, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    listing = (f" Recipes in {cwd / RECIPES_DIR}: {', '.join(available)}" if available
               else f" (no {RECIPES_DIR}/ directory under {cwd})")
    raise FileNotFoundError(f"no recipe file {name!r}{hint}.{listing}")


def exec_recipe(script: Path, args: list[str]) -> None:
    """Replace this process with ``python script *args`` (same interpreter, same environment)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, str(script), *args])


def run_script(argv: list[str]) -> int:
    """``nemo run`` / ``nemo_opd run``: ``argv`` is ``[RECIPE, *args]``. Returns an exit code
    on error or usage; on success the process is replaced by the recipe."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        print("Runs the recipe with the same interpreter, exactly as `python RECIPE.py args`;"
              " `nemo run RECIPE.py --help` lists its presets and every overridable field.")
        return 0 if argv else 2
    try:
        script = resolve_recipe(argv[0])
    except FileNotFoundError as err:
        print(f"nemo {VERB}: {err}", file=sys.stderr)
        return 2
    exec_recipe(script, argv[1:])
    return 0  # not reached: execv does not return


class ScriptVerb(run.cli.api.Entrypoint):
    """A NeMo-Run entry point that attaches ``run`` to the root ``nemo`` app as a plain command
    (script path + pass-through arguments) instead of a group of registered entry points."""

    @property
    def path(self) -> str:
        # NeMo-Run nests commands by this dotted path; a single part lands on the root app.
        return VERB

    def cli(self, parent: typer.Typer) -> None:
        # NeMo-Run created an empty group with our entry-point name; a group and a command of
        # the same name cannot coexist (Typer lets the group win), so the group goes.
        parent.registered_groups[:] = [g for g in parent.registered_groups if g.name != VERB]

        @parent.command(VERB, help=f"Run a recipe script: {_USAGE[7:]}", add_help_option=False,
                        context_settings={"allow_extra_args": True,
                                          "ignore_unknown_options": True})
        def _run(ctx: typer.Context) -> None:
            raise typer.Exit(run_script(list(ctx.args)))


def _verb(*args: str) -> None:
    """Run a recipe script (``nemo run RECIPE.py [overrides]``)."""


run.cli.entrypoint(_verb, namespace=VERB, entrypoint_cls=ScriptVerb, enable_executor=False)
