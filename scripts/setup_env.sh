#!/usr/bin/env bash
# Create/refresh the project virtual environment for a machine WITHOUT a ROS install.
# Idempotent: a second run with unchanged requirements only checks a stamp and exits.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PY=${PYTHON:-python3}
STAMP="$VENV/.vggt4d_setup_stamp"
HASH=$(cat requirements.txt requirements-ros.txt requirements-rosidl.txt CMakeLists.txt setup.py setup.cfg package.xml msg/*.msg scripts/setup_env.sh scripts/build_interfaces.sh 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup] environment $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing torch, Python dependencies and ROS 2 wheels into $VENV"
if ! python -c 'import torch' 2>/dev/null; then
  pip install -q torch==2.13.0
fi
pip install -q -r requirements.txt -r requirements-ros.txt
# Triton's CPU interpreter runs the refinement's CUDA kernels in the tests
# (test/test_triton_kernels.py). A CUDA torch brings its own matching Triton; next to a CPU
# torch we add the GPU device's version.
if python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
  python -c 'import triton' 2>/dev/null || pip install -q triton==3.6.0
fi
if [ -x scripts/build_interfaces.sh ]; then
  scripts/build_interfaces.sh "$VENV"
fi
pip install -q --no-deps --no-build-isolation -e .
echo "$HASH" > "$STAMP"
echo "[setup] done"
