"""nemo_opd.console: the training progress on a terminal and in a log file, stage lines, the
third-party warnings and progress bars a run hides (and shows again with --verbose)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from nemo_opd.console import KNOWN_WARNINGS, Progress, Stages


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_file_is_plain_lines(caplog):
    """Not a terminal (a SLURM log): no carriage returns, one line every tenth of the run and
    at the last step, each with the step, the fields and an ETA."""
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="nemo_opd"), Progress(40, stream=stream) as bar:
        for step in range(1, 41):
            bar.update(step, {"loss": 1.0 / step})
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == [f"{s}/40" for s in range(4, 41, 4)]
    assert lines[-1].startswith("step 40/40 loss=0.025 eta ")
    assert not any("\r" in line for line in lines)


def test_progress_resumed_counts_from_the_resume_step(caplog):
    with caplog.at_level(logging.INFO, logger="nemo_opd"):
        bar = Progress(30, initial=20, stream=io.StringIO())
        for step in range(21, 31):
            bar.update(step, {})
    assert [r.getMessage().split()[1] for r in caplog.records] == [f"{s}/30"
                                                                   for s in range(21, 31)]


def test_progress_on_a_terminal_is_a_tqdm_bar(caplog):
    terminal = _Terminal()
    with caplog.at_level(logging.INFO, logger="nemo_opd"), Progress(5, stream=terminal) as bar:
        for step in range(1, 6):
            bar.update(step, {"loss": 0.5})
    text = terminal.getvalue()
    assert "\r" in text and "5/5" in text and "loss=0.5" in text and "distill" in text
    assert not caplog.records  # the bar replaces the plain lines


def test_stages_announce_start_and_elapsed(caplog):
    stages = Stages(("teacher eval", "distill", "table"))
    with caplog.at_level(logging.INFO, logger="nemo_opd"):
        stages.start("teacher eval")
        stages.start("distill", "40 steps")
        stages.end()
        stages.end()  # nothing current: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "[1/3] teacher eval ..."
    assert lines[1].startswith("[1/3] teacher eval done in ") and lines[1].endswith(" s")
    assert lines[2] == "[2/3] distill ... (40 steps)"
    assert lines[3].startswith("[2/3] distill done in ")
    assert len(lines) == 4
    with pytest.raises(ValueError, match="unknown stage 'export'"):
        stages.start("export")


_QUIET_PROBE = textwrap.dedent("""
    import sys, warnings
    import nemo_opd  # installs the warning filters
    from nemo_opd.console import configure_console
    from tqdm import tqdm
    configure_console()
    warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning)
    warnings.warn("a warning nobody listed", UserWarning)
    for _ in tqdm(range(3), desc="third-party bar", file=sys.stdout):
        pass
    for _ in tqdm(range(3), desc="own bar", file=sys.stdout, disable=False):
        pass
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_known_warnings_and_third_party_bars_hidden_unless_verbose(verbose):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NEMO_OPD_VERBOSE", None)
    args = ["-v"] if verbose else []
    run = subprocess.run([sys.executable, "-c", _QUIET_PROBE, *args], env=env, text=True,
                         capture_output=True, check=True)
    assert "a warning nobody listed" in run.stderr
    assert ("Transformer Engine and Apex are not installed" in run.stderr) is verbose
    assert ("third-party bar" in run.stdout) is verbose
    assert "own bar" in run.stdout


def test_known_warnings_are_message_patterns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning,
                      stacklevel=1)
        warnings.warn("transformers 5.24.0 is not tested with current version of modelopt",
                      UserWarning, stacklevel=1)
        warnings.warn("Apex is fine", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Apex is fine"]
