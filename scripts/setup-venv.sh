#!/usr/bin/env bash
# Make a virtual environment with the CPU build of torch first (so nothing pulls a CUDA build),
# then this package with its test and ui extras. Usage: bash scripts/setup-venv.sh [VENV_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and pinned, so that no dependency pulls another build (on our CPU machines pip
# finds a CPU build of 2.13.0 on local disk). GPU users install their CUDA torch instead.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
# The tests drive the web UI (the ui extra) in a browser and execute the Colab notebook.
"$venv/bin/python" -m pip install -q -e "$here[test,ui]"
echo "venv ready: $venv"
