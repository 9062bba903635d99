#!/usr/bin/env bash
# Create ./.venv with nemo_opd and its dependencies; reuse it when it is already complete.
# CPU machines get the CPU build of torch first (torch==2.13.0), so nothing pulls CUDA wheels.
# On a GPU machine or inside an NGC container, set NEMO_OPD_TORCH to the torch already wanted
# (or "skip" to keep the installed one, e.g. with NEMO_OPD_VENV_FLAGS=--system-site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${NEMO_OPD_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NEMO_OPD_TORCH:-torch==2.13.0}
STAMP="$VENV/.nemo_opd_installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
echo "[bootstrap] creating $VENV (torch: $TORCH_SPEC)" >&2
"$PYTHON" -m venv ${NEMO_OPD_VENV_FLAGS:-} "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "$TORCH_SPEC" != "skip" ]; then
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -m pip check
touch "$STAMP"
echo "[bootstrap] done: $("$VENV/bin/python" -W ignore -c 'import torch, megatron.core, modelopt; print("torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| modelopt", modelopt.__version__)')" >&2
