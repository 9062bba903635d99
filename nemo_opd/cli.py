"""The ``nemo_opd`` command: ``nemo_opd <subcommand> [args...]``.

Sub-commands hand their arguments on untouched, so each keeps its own ``--help``:

- ``run RECIPE.py [overrides]``: run a recipe (the same as ``nemo run RECIPE.py``).
- ``eval ...``: evaluation (``nemo_opd.eval.cli``: ``--model DIR --tasks ...``, ``compare ...``).
- ``lm_eval ...``: lm-eval's own command line with ``--model nemo_opd`` registered
  (``nemo_opd.eval.lm_eval_cli``).

Handlers import their modules on use, so ``nemo_opd --help`` and each sub-command's ``--help``
answer without importing torch, megatron or ModelOpt.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable

__all__ = ["SUBCOMMANDS", "main"]


def _run(argv: list[str]) -> int:
    from nemo_opd.launch.verb import run_script

    return run_script(argv)


def _eval(argv: list[str]) -> int:
    # Imported on use: evaluation pulls in lm-eval, which `nemo_opd run` does not need.
    from nemo_opd.eval.cli import main as eval_main

    return int(eval_main(argv) or 0)


def _lm_eval(argv: list[str]) -> int:
    from nemo_opd.eval.lm_eval_cli import main as lm_eval_main

    return lm_eval_main(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "run": (_run, "run a recipe: nemo_opd run recipes/onpolicy_qat.py [key=value ...]"),
    "eval": (_eval, "evaluate models and compare result files (nemo_opd eval --help)"),
    "lm_eval": (_lm_eval, "lm-eval's own CLI with --model nemo_opd registered "
                          "(nemo_opd lm_eval --help)"),
}
"""Sub-command name -> (handler taking the remaining arguments, one-line help)."""


def _usage() -> str:
    lines = ["usage: nemo_opd <subcommand> [args...]", "", "subcommands:"]
    lines += [f"  {name:<7} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a sub-command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)  # the closest only
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"nemo_opd: unknown subcommand {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    return SUBCOMMANDS[name][0](rest)
