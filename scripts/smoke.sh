#!/usr/bin/env bash
# Offline, CPU-only smoke run of train and generate on a fresh machine: venv, a tiny random-weight
# SD 1.x model, DreamBooth training on the bundled example images (prior preservation, text
# encoder, 8-bit AdamW), then generation. Writes everything under ${OUT:-smoke-out}/.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$here/smoke-out}"
[ -x "$here/.venv/bin/style-dreambooth" ] || bash "$here/scripts/setup-venv.sh" "$here/.venv"
sd="$here/.venv/bin/style-dreambooth"
export HF_HUB_OFFLINE=1
mkdir -p "$out"
[ -f "$out/tiny-model/model_index.json" ] || "$sd" random-model --shape tiny "$out/tiny-model"
"$sd" token yltcaxe
"$sd" train --base-model "$out/tiny-model" --instance-dir "$here/examples/style_images" \
  --instance-prompt "yltcaxe artstyle" --class-prompt "artstyle" --class-dir "$out/class-images" \
  --output-dir "$out/run" --resolution 64 --num-class-images 8 --class-inference-steps 10 \
  --max-train-steps 30 --learning-rate 1e-4 --checkpointing-steps 15 --validation-steps 15 \
  --validation-prompt "a boy in yltcaxe artstyle" --overwrite
"$sd" generate --model "$out/run" --prompt "a boy in yltcaxe artstyle" -n 4 --steps 20 --out "$out/generated" --overwrite
echo "done: run folder $out/run, images $out/generated (a random-weight model paints noise-like images;"
echo "      with real SD 1.5 weights use the GPU quickstart in README.md)"
