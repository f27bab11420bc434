#!/usr/bin/env bash
# The offline demo on a fresh machine (CPU only, no downloads of model weights): make the venv,
# then run `style-dreambooth demo`, which fine-tunes the bundled tiny SD 1.x base model of the
# proof world on a toy artist style, judges the results and writes ${OUT:-demo-out}/index.html.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$here/.venv/bin/style-dreambooth" ] || bash "$here/scripts/setup-venv.sh" "$here/.venv"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$here/.venv/bin/style-dreambooth" demo --out "${OUT:-$here/demo-out}"
