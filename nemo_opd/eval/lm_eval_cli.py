"""lm-eval's own command line with ``--model nemo_opd`` registered.

``nemo_opd lm_eval ARGS...`` (or ``python -m nemo_opd.eval.lm_eval_cli ARGS...``) is
``lm_eval ARGS...`` — lm-eval's ``cli_evaluate``, unchanged, given the same arguments — in a
process where :class:`~nemo_opd.eval.lm.MegatronLM` is registered as ``nemo_opd``::

    nemo_opd lm_eval --model nemo_opd --model_args pretrained=/models/Qwen3-8B,dtype=bfloat16 \\
        --tasks hellaswag --batch_size 8 --output_path results/
    torchrun --nproc-per-node 2 -m nemo_opd.eval.lm_eval_cli --model nemo_opd \\
        --model_args pretrained=export/,export=true,tp=2 --tasks arc_easy

Why not plain ``lm_eval --model nemo_opd``: lm-eval 0.4.13 finds models only in its own
``lm_eval.models.MODEL_MAPPING`` and in classes registered by code already imported into the
process; it reads no entry-point group and has no option that imports a user module
(``--include_path`` loads task YAMLs only). Upstream: EleutherAI/lm-evaluation-harness issues
#1457, #1621 and #3282, pull request #3672 (``--include_package``, open). Their own suggested
workaround is this module: import the model, then call ``cli_evaluate``.

Registration is lazy (a ``"module:Class"`` placeholder): ``--help`` and runs of lm-eval's other
models import neither megatron nor ModelOpt.
"""

from __future__ import annotations

import sys

__all__ = ["main", "register"]

_TARGET = "nemo_opd.eval.lm:MegatronLM"


def register() -> None:
    """Register ``nemo_opd`` in lm-eval's model registry (idempotent), without importing it."""
    import lm_eval.models  # noqa: F401  (lm-eval's own names first; see nemo_opd.eval.lm.MODEL_NAME)
    from lm_eval.api.registry import model_registry

    if "nemo_opd" not in model_registry:
        model_registry.register("nemo_opd", target=_TARGET)


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default ``sys.argv[1:]``); returns 0 or raises
    ``SystemExit`` as lm-eval does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's parser reads sys.argv itself (it inserts its default `run` verb there).
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
