"""How long ``--help`` of each entry point takes, and whether it imports megatron or ModelOpt.

    OMP_NUM_THREADS=1 python bench/bench_help.py               # 3 rounds
    OMP_NUM_THREADS=1 python bench/bench_help.py --repeats 5 --json help.json

Every measurement is a fresh subprocess running the command as a user types it (the ``nemo_opd``
console script next to this Python, ``python recipes/<recipe>.py``), wall-clock from start to
exit. The commands run interleaved round-robin (one of each per round), so a burst of load on a
shared machine lands on all of them rather than on one; min and median per command are reported.

Separately, once per command, a probe process runs the same entry point in-process
(``runpy``) and reports which of ``megatron``, ``modelopt``, ``torch`` and ``lm_eval`` it
imported, and whether anything was printed to stderr (the warnings megatron prints on import).
The goal (issue 16): every ``--help`` under 5 s, without megatron or ModelOpt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("megatron", "modelopt", "torch", "lm_eval")

# (label, argv after the interpreter for the probe, how to run it: ("module"|"path", target))
ENTRY_POINTS = (
    ("nemo_opd --help", ["nemo_opd", "--help"], ("module", "nemo_opd")),
    ("nemo_opd eval --help", ["nemo_opd", "eval", "--help"], ("module", "nemo_opd")),
    ("nemo_opd eval compare --help", ["nemo_opd", "eval", "compare", "--help"],
     ("module", "nemo_opd")),
    ("nemo_opd lm_eval --help", ["nemo_opd", "lm_eval", "--help"], ("module", "nemo_opd")),
    ("python recipes/onpolicy_qat.py --help", ["recipes/onpolicy_qat.py", "--help"],
     ("path", "recipes/onpolicy_qat.py")),
    # NeMo-Run's `nemo` imports NeMo-Run, then the verb execs `python recipes/...`: the probe
    # is the recipe's.
    ("nemo run recipes/onpolicy_qat.py --help", ["nemo", "run", "recipes/onpolicy_qat.py",
                                                 "--help"], ("path", "recipes/onpolicy_qat.py")),
    ("python recipes/sweep.py --help", ["recipes/sweep.py", "--help"],
     ("path", "recipes/sweep.py")),
)

_PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_{kind}({target!r}, run_name="__main__")
except SystemExit:
    pass
print("PROBE " + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def _command(argv: list[str]) -> list[str]:
    """What a user runs: the console script for ``nemo_opd``/``nemo``, ``python FILE`` for
    recipes."""
    if argv[0] in ("nemo_opd", "nemo"):
        script = Path(sys.executable).with_name("nemo_opd")
        return [str(script), *argv[1:]] if script.exists() else [sys.executable, "-m", *argv]
    return [sys.executable, *argv]


def _time_once(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start, done.returncode


def _probe(argv: list[str], kind: str, target: str, env: dict[str, str]) -> dict:
    code = _PROBE.format(argv=argv, kind=kind, target=target, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE")]
    imported = lines[-1].removeprefix("PROBE ").split(",") if lines else ["?"]
    return {"imported": [m for m in imported if m],
            "stderr_lines": len(done.stderr.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    times: dict[str, list[float]] = {label: [] for label, _, _ in ENTRY_POINTS}
    codes: dict[str, set[int]] = {label: set() for label, _, _ in ENTRY_POINTS}
    for _ in range(args.repeats):
        for label, argv, _ in ENTRY_POINTS:
            seconds, code = _time_once(_command(argv), env)
            times[label].append(seconds)
            codes[label].add(code)
    rows = []
    for label, argv, (kind, target) in ENTRY_POINTS:
        probe = _probe(argv[2:] if argv[0] == "nemo" else argv, kind, target, env)
        rows.append({"command": label, "min_s": min(times[label]),
                     "median_s": statistics.median(times[label]), "runs": times[label],
                     "exit_codes": sorted(codes[label]), **probe})

    print(f"{'command':<40} {'min s':>6} {'median s':>8}  exit  stderr  imports")
    for row in rows:
        heavy = ", ".join(row["imported"]) or "-"
        print(f"{row['command']:<40} {row['min_s']:6.2f} {row['median_s']:8.2f}  "
              f"{','.join(map(str, row['exit_codes'])):<4}  {row['stderr_lines']:>6}  {heavy}")
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
