"""Notice that the job is about to be stopped, so the trainer can checkpoint first.

SLURM signals a job ``preempt_grace_s`` before its time limit (``--signal=USR1@300``; torchrun
forwards SIGUSR1 to every worker) and sends SIGTERM on preemption or cancellation. Inside
:class:`PreemptionFlag` these signals only set a flag; the trainer polls it after every
optimizer step (``run_distillation(..., should_stop=flag)``), saves a checkpoint at that step
and returns, and the recipe exits non-zero so that the job is requeued::

    with PreemptionFlag() as preempted:
        result = run_distillation(cfg, should_stop=preempted)
    if result.preempted:
        ...  # checkpoint saved at result.steps_done; exit non-zero

While the flag is installed a signal no longer kills the process: the step in flight and the
save must finish within the grace period (torchrun kills the workers after
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds). Outside it the previous handlers are back.

Signals to the whole process group (``kill -TERM -<pgid>``, container runtimes, some
schedulers) also reach the helper processes a checkpoint save starts: megatron's
``FileSystemWriterAsync`` keeps a ``multiprocessing`` manager process alive after the first
save (its queue collects every later save's write results) and forks writer processes per save.
Those run with default signal actions, so a group signal killed the manager and the next save
died with ``BrokenPipeError``. :func:`preemption_signals_blocked` wraps every save: processes
started inside it inherit a signal mask that holds these signals back, so only the trainer
itself acts on them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.resource_tracker
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["PREEMPTION_SIGNALS", "PreemptionFlag", "preemption_signals_blocked"]

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""SLURM's warning before the time limit (``--signal=USR1@...``) and its termination signal."""


class PreemptionFlag:
    """Context manager that records whether one of ``signals`` arrived; call it to ask.

    Handlers are installed on ``__enter__`` and the previous ones restored on ``__exit__``.
    Python sets signal handlers from the main thread only: elsewhere nothing is installed (a
    warning says so) and the flag stays False. The flag stays set once a signal
    arrived; :attr:`received` names the first one.
    """

    def __init__(self, signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: no logging or I/O inside a signal handler (the interrupted code may
        # hold the same locks). The trainer logs when it stops.
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> PreemptionFlag:
        if self._previous:
            raise RuntimeError("PreemptionFlag is already installed")
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: %s will not stop training with a checkpoint",
                           "/".join(s.name for s in self.signals))
            return self
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __call__(self) -> bool:
        """Whether a signal arrived (since construction)."""
        return self.received is not None


@contextlib.contextmanager
def preemption_signals_blocked(signals: Iterable[signal.Signals] = PREEMPTION_SIGNALS
                               ) -> Iterator[None]:
    """Block ``signals`` in this thread while the body runs, so that every process started in it
    (fork or spawn: a blocked mask survives both, and Python does not unblock it) never sees them.

    Wrap code that starts helper processes which must outlive a signal to the process group:
    checkpoint saves (megatron's writer manager and writer processes). A signal that arrives
    meanwhile stays pending for this process and is handled when the body ends (or earlier by
    another of its threads; a :class:`PreemptionFlag` handler only sets its flag either way).
    The processes started inside keep the mask for their whole life, so a group signal leaves
    them running until the trainer ends them.

    CPython's multiprocessing resource tracker unblocks SIGINT/SIGTERM in the calling thread
    right after it starts its own process, which a save may trigger; it is started first (it
    ignores SIGINT/SIGTERM itself and inherits the block of the others) and the mask set again.
    """
    signals = set(signals)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
