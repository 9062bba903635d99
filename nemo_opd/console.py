"""What a run prints, in one place: third-party noise, stage lines and the training progress.

* :func:`filter_known_warnings` (installed when :mod:`nemo_opd` is imported) hides the
  third-party warnings every CPU or container run triggers and nobody can act on
  (:data:`KNOWN_WARNINGS`: Transformer Engine/Apex missing, ModelOpt's untested-transformers
  notice, deprecations inside megatron-core...). Each is matched by its message; any other
  warning still shows.
* :func:`configure_console` (called by the recipes at start) sets the log format, keeps
  third-party loggers at WARNING and turns off third-party progress bars (lm-eval's request
  building, ModelOpt's importer, HF datasets) — nemo_opd's own bars pass ``disable``
  explicitly and stay.
* :class:`Stages` prints one line when a stage of a run starts and one with its elapsed time
  when it ends.
* :class:`Progress` is the training progress: a tqdm bar with ETA on a terminal, one plain line
  every few steps otherwise (a SLURM log gets no ``\\r``).

Everything hidden comes back with ``--verbose``/``-v`` on the command line or
``NEMO_OPD_VERBOSE=1`` in the environment (which ``--verbose`` sets for child processes).
"""

import contextlib
import functools
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["KNOWN_WARNINGS", "Progress", "Stages", "configure_console", "filter_known_warnings",
           "is_verbose", "third_party_prints_off"]

logger = logging.getLogger("nemo_opd")

KNOWN_WARNINGS: tuple[str, ...] = (
    r"Transformer Engine and Apex are not installed",  # megatron-core on CPU
    r"Apex is not installed",  # megatron-core on CPU
    r"transformers \S+ is not tested with current version of modelopt",
    r"full scope is deprecated",  # megatron-core's own TransformerConfig default
    r"\S+\.sharded_state_dict is not the version ModelOpt patches",  # handled: models/checkpoint
    r"Distributed training is initialized but no parallel_state is set",  # ModelOpt, TP=1
    r"The given buffer is not writable",  # ModelOpt's state (de)serialisation
)
"""Message regexes of the third-party warnings :func:`filter_known_warnings` hides."""

THIRD_PARTY_LOGGERS = ("lm_eval", "megatron", "modelopt", "datasets", "transformers",
                       "torch.distributed", "nemo_run", "matplotlib")
"""Loggers kept at WARNING by :func:`configure_console` (INFO with ``--verbose``)."""

_VERBOSE_ENV = "NEMO_OPD_VERBOSE"


def is_verbose() -> bool:
    """``NEMO_OPD_VERBOSE=1``, or ``-v``/``--verbose`` on this process's command line."""
    return (os.environ.get(_VERBOSE_ENV) == "1"
            or any(arg in ("-v", "--verbose") for arg in sys.argv[1:]))


def filter_known_warnings() -> None:
    """Hide :data:`KNOWN_WARNINGS` unless verbose; the environment carries the choice to the
    job's worker processes."""
    if is_verbose():
        os.environ[_VERBOSE_ENV] = "1"
        return
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def configure_console() -> None:
    """Log format, third-party log levels and progress bars for a run (rank 0 logs INFO, the
    other ranks WARNING, as torchrun's ``RANK`` says)."""
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if is_verbose():
        return
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _third_party_bars_off()


@functools.cache
def _third_party_bars_off() -> None:
    # tqdm reads its TQDM_* defaults once, when it is imported (before any of ours runs), so
    # the default is set on the class; a bar that passes `disable` itself (nemo_opd's) keeps it.
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    tqdm.std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def third_party_prints_off() -> contextlib.AbstractContextManager:
    """Drop what third-party code ``print``s to stdout in this block (ModelOpt's "Inserted N
    quantizers", "Exporting model with ..."), unless verbose; nemo_opd logs the same facts."""
    return contextlib.nullcontext() if is_verbose() else contextlib.redirect_stdout(io.StringIO())


def _isatty(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class Stages:
    """One line as each stage starts and one as it ends, with its elapsed time (rank 0).

    Example: ``[3/7] distill ...`` then ``[3/7] distill done in 52.1 s``.
    """

    def __init__(self, names: Sequence[str], *, enabled: bool = True) -> None:
        self.names, self.enabled = list(names), enabled
        self._current: str | None = None
        self._t0 = self._start = time.perf_counter()

    def _label(self, name: str) -> str:
        return f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"

    def start(self, name: str, note: str = "") -> None:
        """End the current stage (if any) and start ``name`` (one of the stage names)."""
        if name not in self.names:
            raise ValueError(f"unknown stage {name!r}; stages: {self.names}")
        self.end()
        self._current, self._start = name, time.perf_counter()
        if self.enabled:
            logger.info("%s ...%s", self._label(name), f" ({note})" if note else "")

    def end(self, note: str = "") -> None:
        """End the current stage, printing its elapsed time."""
        if self._current is not None and self.enabled:
            logger.info("%s done in %.1f s%s", self._label(self._current),
                        time.perf_counter() - self._start, f" ({note})" if note else "")
        self._current = None

    @property
    def elapsed(self) -> float:
        """Seconds since the stages were created."""
        return time.perf_counter() - self._t0


class Progress:
    """Training progress: a tqdm bar (ETA, the step's loss) on a terminal, else one plain log
    line every ``every`` steps and at the last one.

    Args:
        total: the run's last step; ``initial``: the step it starts after (resume).
        stream: where the bar goes (stderr); its ``isatty`` picks bar or lines.
        every: plain-line interval (default: a tenth of the run, at least 1).
    """

    def __init__(self, total: int, *, initial: int = 0, stream: TextIO | None = None,
                 every: int | None = None) -> None:
        self.total, self.initial = total, initial
        self.stream = sys.stderr if stream is None else stream
        self.every = every or max(1, (total - initial) // 10)
        self._t0 = time.perf_counter()
        self._bar = None
        if _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="distill", unit="step",
                             file=self.stream, dynamic_ncols=True, disable=False)

    def update(self, step: int, fields: dict[str, float]) -> None:
        """Step ``step`` (1-based) is done; ``fields`` are shown beside it."""
        text = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(step - self._bar.n)
            if step >= self.total:
                self._bar.close()
            return
        if (step - self.initial) % self.every and step != self.total:
            return
        rate = (time.perf_counter() - self._t0) / max(step - self.initial, 1)
        logger.info("step %d/%d %s eta %.0fs", step, self.total, text,
                    rate * (self.total - step))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
