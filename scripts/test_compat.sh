#!/usr/bin/env bash
# Run the test suite against current megatron-core: Python 3.12 with the newest megatron-core that
# pyproject.toml allows (megatron-core >= 0.17 needs Python >= 3.12, so ./.venv on 3.10/3.11 keeps
# 0.16.x). Builds ./.venv-compat once and reuses it; arguments go to pytest.
#   make test-compat                                     # the whole suite
#   make test-compat PYTEST_ARGS="tests/test_models.py"  # part of it
#   scripts/test_compat.sh tests/test_models.py -x       # the same, directly
# Knobs (environment):
#   COMPAT_PYTHON  interpreter for the venv (default: python3.12 from pyenv or PATH)
#   COMPAT_VENV    venv directory (default .venv-compat)
#   COMPAT_TORCH   torch requirement (default torch==2.13.0; on 3.12 pip takes the CUDA wheel from
#                  PyPI, several GB, which runs on CPU too; "skip" keeps what is installed)
#   COMPAT_MCORE   megatron-core requirement (default: the newest pyproject.toml allows)
# A different COMPAT_* value, or a newer pyproject.toml, rebuilds the venv's packages.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local p
  # the newest pyenv 3.12.x first, then PATH
  for p in $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV) \
           "$(command -v python3.12 || true)"; do
    if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

PYTHON=${COMPAT_PYTHON:-$(find_python312 || true)}
if [ -z "$PYTHON" ]; then
  echo "[test-compat] no Python 3.12 found (pyenv install 3.12, or set COMPAT_PYTHON)" >&2
  exit 2
fi
VENV=${COMPAT_VENV:-.venv-compat}
TORCH_SPEC=${COMPAT_TORCH:-torch==2.13.0}
MCORE_SPEC=${COMPAT_MCORE:-}
STAMP="$VENV/.nemo_opd_compat_installed"
WANT="python=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') torch=$TORCH_SPEC mcore=${MCORE_SPEC:-newest}"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  :
else
  echo "[test-compat] building $VENV ($WANT)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$TORCH_SPEC" != "skip" ]; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  # --upgrade: a reused venv moves to the newest megatron-core the pin allows
  PIN=$(sed -n 's/^ *"megatron-core\([^"]*\)".*/\1/p' pyproject.toml)
  "$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy only-if-needed \
    -e ".[dev]" "${MCORE_SPEC:-megatron-core$PIN}"
  "$VENV/bin/python" -m pip check
  echo "$WANT" > "$STAMP"
fi

"$VENV/bin/python" -W ignore - <<'EOF' >&2
import sys
from importlib.metadata import version
pkgs = ("torch", "megatron-core", "nvidia-modelopt", "transformers")
print("[test-compat] python", sys.version.split()[0], "|", " | ".join(f"{p} {version(p)}" for p in pkgs))
EOF

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/python" -m pytest -q "$@"
