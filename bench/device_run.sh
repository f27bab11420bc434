#!/usr/bin/env bash
# Every GPU measurement in one call, for a lent H100/H200 (offline, about 10 minutes at most):
# install the carried wheels, then the stages BENCH_ROWS names, in order:
#   sd15   the SD 1.5-shaped random model: training (ours and diffusers' scripts, same call), generation
#   tests  the GPU-only tests (pytest -m gpu)
#   sdxl   the SDXL base 1.0-shaped random model: LoRA training at 1024 px (ours and
#          train_dreambooth_lora_sdxl.py), generation (ours and StableDiffusionXLPipeline)
#   flux   the FLUX.1-dev-shaped random model (11.9 B transformer + T5-XXL, drawn on the GPU in bf16, 34 GB):
#          LoRA training at 1024 px, bf16, ours and train_dreambooth_lora_flux.py (BENCH_ROWS=flux: a call of its own)
# BENCH_ROWS defaults to "sd15,tests,sdxl": sdxl then starts only if BENCH_SDXL_MIN_S (300) of the
# budget remain, which after the SD 1.5 rows it seldom does; BENCH_ROWS=sdxl gives SDXL a call of its own.
# BENCH_SDXL_RESERVE_S (default 0) holds that many seconds of the budget back from the stages before sdxl.
#
# Prepare here (CPU machine), once:
#   python bench/device_wheels.py                                  # -> .whl/ (13 MiB)
#   mkdir -p .baseline && for f in train_dreambooth.py train_dreambooth_lora.py train_dreambooth_lora_sdxl.py \
#       train_dreambooth_lora_flux.py; do
#     git -C DIFFUSERS_CHECKOUT show HEAD:examples/dreambooth/$f > .baseline/$f; done
# Then, through the device tool: command "bash bench/device_run.sh" (or "BENCH_ROWS=sdxl BENCH_BUDGET_S=520
# bash bench/device_run.sh"), carry [".whl", ".baseline"].
# Results come back in $OUT: train_bench.json, generate_bench.json, train_sdxl_bench.json,
# generate_sdxl_bench.json, their short logs, gpu_tests.log, and logs.tgz (every run's whole log,
# repacked after each stage, so a call cut short still brings back the logs of what ran).
#
# BENCH_BUDGET_S (default 500) bounds the whole script: each stage starts no new run past its share.
# A stage that fails (a model that does not build, a baseline script that dies) does not stop the next.
# CPU smoke test of the plumbing (tiny and sdxl-tiny models, 64 px, fp32, the venv's python, no wheels;
# budget 650 s of which 150 are held for sdxl, whose generation skips the compiled side there):
#   BENCH_SMOKE=1 PY=.venv/bin/python OUT=/tmp/smoke bash bench/device_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/bench-results}
WORK=${BENCH_WORK:-/tmp/bench}   # models and run folders: large, never copied back
ROWS=${BENCH_ROWS:-sd15,tests,sdxl}
mkdir -p "$OUT" "$WORK"
start=$SECONDS
PY=${PY:-python3}
if [ -n "${BENCH_SMOKE:-}" ]; then
  BUDGET=${BENCH_BUDGET_S:-650}; reserve=${BENCH_SDXL_RESERVE_S:-150}
  sd15=tiny; sdxl=sdxl-tiny; sdxl_min=${BENCH_SDXL_MIN_S:-30}; sdxl_sides=${BENCH_SDXL_GEN_SIDES:-ours,diffusers}
  flux=flux-tiny; flux_build=()
  train=(--resolution 64 --precision no --steps 3,6); train_xl=("${train[@]}"); train_flux=("${train[@]}")
  gen=(--cpu --steps 2 --size 64); gen_xl=(--cpu --steps 2 --size 64 --batches 1:2,2:1)
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # the caller's entries too (e.g. a torchvision)
else
  BUDGET=${BENCH_BUDGET_S:-500}; reserve=${BENCH_SDXL_RESERVE_S:-0}
  sd15=sd15; sdxl=sdxl; sdxl_min=${BENCH_SDXL_MIN_S:-300}
  sdxl_sides=${BENCH_SDXL_GEN_SIDES:-ours,diffusers,diffusers-compiled}
  flux=flux-dev; flux_build=(--dtype bf16 --device cuda); train_flux=(--steps 5,20)
  # SDXL: a shorter window (no compilation to wait out), and fewer images per batch size (about 3 s each at 1024 px).
  train=(); train_xl=(--steps 10,40)
  gen=(); gen_xl=(--size 1024 --batches 1:3,4:2)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="$PWD/src:/tmp/site"
fi
case ",$ROWS," in *,sdxl,*) ;; *) reserve=0 ;; esac
left() { echo $((BUDGET - reserve - (SECONDS - start))); }   # of the budget, for the stage that is running
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BENCH_SKIP_PEFT_CHECK=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, diffusers, bitsandbytes; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" 2>&1 | grep -v gemm_4bit

baseline=()
for pair in "script train_dreambooth" "lora-script train_dreambooth_lora" "sdxl-lora-script train_dreambooth_lora_sdxl" \
    "flux-lora-script train_dreambooth_lora_flux"; do
  set -- $pair
  [ -f ".baseline/$2.py" ] && baseline+=("--diffusers-$1" ".baseline/$2.py")
done

pack_logs() { (cd "$WORK" && tar czf "$OUT/logs.tgz" ./*.log ./*.json 2>/dev/null); }

build_model() {  # SHAPE [ARGS...] -> $WORK/model-SHAPE (kept: a later call on a still-warm machine reuses it)
  local shape=$1 dir="$WORK/model-$1" t=$SECONDS; shift
  if [ -f "$dir/model_index.json" ]; then echo "model-$shape reused"; return 0; fi
  $PY -m style_dreambooth random-model --shape "$shape" "$@" --overwrite "$dir" >"$WORK/random-model-$shape.log" 2>&1 \
    || { echo "model-$shape FAILED to build:"; tail -20 "$WORK/random-model-$shape.log"; return 1; }
  echo "model-$shape built in $((SECONDS - t)) s"
}

generate() {  # NAME MODEL-SHAPE ARGS...: the generation benchmark, its whole output in $WORK/generate-NAME.log
  local name=$1 shape=$2; shift 2
  timeout $(( $(left) > 30 ? $(left) - 20 : 10 )) $PY bench/bench_generate.py --model "$WORK/model-$shape" --out "$OUT" "$@" \
    2>&1 | tee "$WORK/generate-$name.log" | grep -E "img/s|FAILED|skipped"
}

run_sd15() {
  build_model "$sd15" || return 1
  $PY bench/bench_train.py --out "$WORK" --model "$WORK/model-$sd15" --shape "$sd15" "${train[@]}" "${baseline[@]}" \
    --configs "${BENCH_TRAIN_CONFIGS:-full-fp16,lora-fp16,t4-fp16,full-bf16,full-fp16-gc,full-fp16-compile,full-fp16-no-cache}" \
    --budget-s $(( $(left) * 60 / 100 )) --run-timeout-s 240 --json "$OUT/train_bench.json" \
    2>&1 | grep -v '^ ' | tee "$OUT/train.log"
  pack_logs
  generate sd15 "$sd15" "${gen[@]}" --budget-s $(( $(left) * 50 / 100 )) | tee "$OUT/generate.log"
}

run_tests() {
  if [ "$(left)" -le 60 ]; then echo "GPU tests skipped: $(left) s of the budget left"; return 0; fi
  timeout $(( $(left) - 10 )) $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_reference_losses.py \
    >"$OUT/gpu_tests.log" 2>&1
  tail -5 "$OUT/gpu_tests.log"
}

run_sdxl() {
  if [ "$(left)" -lt "$sdxl_min" ]; then
    echo "SDXL rows skipped: $(left) s of the budget left, they need $sdxl_min (BENCH_ROWS=sdxl runs them alone)"
    return 0
  fi
  build_model "$sdxl" || return 1
  $PY bench/bench_train.py --out "$WORK" --model "$WORK/model-$sdxl" --shape "$sdxl" "${train_xl[@]}" "${baseline[@]}" \
    --configs "${BENCH_SDXL_TRAIN_CONFIGS:-sdxl-lora-fp16}" --budget-s $(( $(left) * 55 / 100 )) --run-timeout-s 300 \
    --json "$OUT/train_sdxl_bench.json" 2>&1 | grep -v '^ ' | tee "$OUT/train_sdxl.log"
  pack_logs
  generate sdxl "$sdxl" "${gen_xl[@]}" --json "$OUT/generate_sdxl_bench.json" \
    --sides "$sdxl_sides" --budget-s $(( $(left) * 60 / 100 )) \
    | tee "$OUT/generate_sdxl.log"
}

run_flux() {
  build_model "$flux" "${flux_build[@]}" || return 1
  $PY bench/bench_train.py --out "$WORK" --model "$WORK/model-$flux" --shape "$flux" "${train_flux[@]}" "${baseline[@]}" \
    --configs "${BENCH_FLUX_TRAIN_CONFIGS:-flux-lora-bf16-gc,flux-lora-bf16}" --budget-s $(( $(left) * 80 / 100 )) \
    --run-timeout-s 330 --json "$OUT/train_flux_bench.json" 2>&1 | grep -v '^ ' | tee "$OUT/train_flux.log"
}

for stage in ${ROWS//,/ }; do
  t=$SECONDS
  [ "$stage" = sdxl ] && reserve=0   # what was held back is this stage's now
  echo "== $stage ($(left) s of the budget left)"
  case $stage in
    sd15) run_sd15 ;;
    tests) run_tests ;;
    sdxl) run_sdxl ;;
    flux) run_flux ;;
    *) echo "unknown stage '$stage' in BENCH_ROWS; use sd15, tests, sdxl, flux" ;;
  esac
  pack_logs
  echo "== $stage done in $((SECONDS - t)) s"
done
echo "device_run done in $((SECONDS - start)) s"
