#!/usr/bin/env bash
# Every GPU measurement in one call, for a lent H100 (offline, about 10 minutes at most):
# install the carried wheels, build the SD 1.5-shaped random model, run the training benchmark
# (ours and diffusers' scripts, same call), the generation benchmark, and the GPU-only tests.
#
# Prepare here (CPU machine), once:
#   python bench/device_wheels.py                                  # -> .whl/ (13 MiB)
#   mkdir -p .baseline && for f in train_dreambooth.py train_dreambooth_lora.py; do
#     git -C DIFFUSERS_CHECKOUT show HEAD:examples/dreambooth/$f > .baseline/$f; done
# Then, through the device tool: command "bash bench/device_run.sh", carry [".whl", ".baseline"].
# Results come back in $OUT: train_bench.json, generate_bench.json, the logs (logs.tgz).
#
# BENCH_BUDGET_S (default 500) bounds the whole script: each stage starts no new run past its share.
# CPU smoke test of the plumbing (tiny model, 64 px, fp32, the venv's python, no wheels):
#   BENCH_SMOKE=1 PY=.venv/bin/python OUT=/tmp/smoke bash bench/device_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/bench-results}
WORK=${BENCH_WORK:-/tmp/bench}   # models and run folders: large, never copied back
BUDGET=${BENCH_BUDGET_S:-500}
mkdir -p "$OUT" "$WORK"
start=$SECONDS
left() { echo $((BUDGET - (SECONDS - start))); }
PY=${PY:-python3}
if [ -n "${BENCH_SMOKE:-}" ]; then
  shape=(--shape tiny --resolution 64 --precision no --steps 3,6); gen=(--cpu --steps 2 --size 64); model=model-tiny
  export PYTHONPATH="$PWD/src"
else
  shape=(); gen=(); model=model-sd15
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="$PWD/src:/tmp/site"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BENCH_SKIP_PEFT_CHECK=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, diffusers, bitsandbytes; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" 2>&1 | grep -v gemm_4bit

t=$SECONDS
$PY -m style_dreambooth random-model --shape "${model#model-}" "$WORK/$model" >"$WORK/random-model.log" 2>&1 \
  || { tail -20 "$WORK/random-model.log"; exit 1; }
echo "model built in $((SECONDS - t)) s"

baseline=()
[ -f .baseline/train_dreambooth.py ] && baseline+=(--diffusers-script .baseline/train_dreambooth.py)
[ -f .baseline/train_dreambooth_lora.py ] && baseline+=(--diffusers-lora-script .baseline/train_dreambooth_lora.py)
$PY bench/bench_train.py --out "$WORK" --model "$WORK/$model" "${shape[@]}" "${baseline[@]}" \
  --configs "${BENCH_TRAIN_CONFIGS:-full-fp16,lora-fp16,t4-fp16,full-bf16,full-fp16-gc,full-fp16-compile,full-fp16-no-cache}" \
  --budget-s $(( $(left) * 60 / 100 )) --run-timeout-s 240 --json "$OUT/train_bench.json" \
  2>&1 | grep -v '^ ' | tee "$OUT/train.log"

$PY bench/bench_generate.py --model "$WORK/$model" --out "$OUT" "${gen[@]}" --budget-s $(( $(left) * 50 / 100 )) \
  2>&1 | grep -E "img/s|FAILED" | tee "$OUT/generate.log"

if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 10 )) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_reference_losses.py \
    >"$OUT/gpu_tests.log" 2>&1
  tail -5 "$OUT/gpu_tests.log"
fi
(cd "$WORK" && tar czf "$OUT/logs.tgz" ./*.log ./*.json 2>/dev/null)
echo "device_run done in $((SECONDS - start)) s"
