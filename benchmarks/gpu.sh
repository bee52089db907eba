#!/usr/bin/env bash
# The paper-size model on one CUDA GPU in one call (meant to finish in under 8 minutes on an
# H100/H200). Every step appends dated rows to BENCHMARKS.md, section "Paper model on a GPU":
#   1. python run.py mode=benchmark benchmark=gpu: inference images/s and peak memory at batch
#      1, 8, 32 and training at batch 8, fp32 and bf16, ours and the original's structure, then
#      ours with compiled experts and channels-last;
#   2. a 50-step training run of the paper model (ViT-B/14 reg4, 6/6/6 experts, top-3, 392 px)
#      through run.py on generated 392 px images: loss finite and falling;
#   3. python run.py mode=test on its checkpoints/last.ckpt;
#   4. the training run and mode=test of steps 2 and 3 with trainer.precision=bf16-mixed;
#   5. benchmarks/bf16_decisions.py: test decisions of the demo model that bf16 autocast changes;
#   6. the parity test (tests/test_parity.py) with the model on the GPU.
# Backbone weights are random (model.backbone.weights=random): the GPU machine has no internet,
# and speed and memory do not depend on the weights.
#
#   benchmarks/gpu.sh              on the GPU machine, rows go to BENCHMARKS.md
#   benchmarks/gpu.sh --dry-run    the same steps on the CPU with a tiny model (about a minute);
#                                  rows go to <run folder>/BENCHMARKS.md
# Environment: GPU_BENCH_DRY_RUN=1 (same as --dry-run), GPU_BENCH_OUT (run folder, default
# logs/gpu_bench/<UTC time>), BENCHMARKS_FILE (where rows go), PYTHON (interpreter, default python),
# GPU_BENCH_LIMIT_S (seconds for step 1, default 300: a variant not finished by then is stopped;
# the rows of the finished ones stay).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${GPU_BENCH_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python}"
OUT="${GPU_BENCH_OUT:-logs/gpu_bench/$(date -u +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import this checkout's src/

if [[ "$DRY_RUN" == 1 ]]; then
  NAME=gpu_dry_run
  FILE="${BENCHMARKS_FILE:-$OUT/BENCHMARKS.md}"
  STEPS=10
  BATCH=2
  # Both structures in fp32, and ours in bf16 with channels-last (torch.compile is left to the GPU run).
  BENCH=(model=tiny benchmark.device=cpu benchmark.image_size=56 "benchmark.infer_batch_sizes=[1,2]"
         benchmark.train_batch_size=2 benchmark.warmup=0 benchmark.iterations=1
         "benchmark.variants=[{precision:fp32},{precision:bf16,channels_last:true,structures:[ours]}]")
  RUN=(model=tiny trainer=cpu dataset.image_size=56 dataset.resize=64 dataset.batch_size="$BATCH" dataset.test_batch_size=4
       +dataset.generate_size=64 +dataset.num_train=8 +dataset.num_test_good=2 +dataset.num_test_defect=1)
  FALLING=()
  PARITY=(-k "test_routing_matches and sparse")  # one parity test: the CPU suite runs them all
  PARITY_DEVICE=cpu
else
  NAME=gpu
  FILE="${BENCHMARKS_FILE:-$PWD/BENCHMARKS.md}"
  STEPS=50
  BATCH=8
  BENCH=()
  RUN=(trainer=gpu dataset.image_size=392 dataset.resize=448 dataset.batch_size="$BATCH" dataset.test_batch_size=16
       dataset.num_workers=8 +dataset.generate_size=448 +dataset.num_train=64 +dataset.num_test_good=8
       +dataset.num_test_defect=4)
  FALLING=(--require-falling)
  PARITY=()
  PARITY_DEVICE=cuda
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run benchmarks/gpu.sh --dry-run on a CPU')"
fi
START=$SECONDS
echo "benchmarks/gpu.sh: run folder $OUT, rows to $FILE" >&2

# A failed step writes a FAILED row and the script goes on to the next one (exit status 1 at the end).
STATUS=0
failed() {  # failed <measurement> <exit status> <log>
  STATUS=1
  "$PYTHON" benchmarks/gpu_checks.py failed --file "$FILE" --benchmark "$NAME" --measurement "$1" --rc "$2" --log "$3"
}

# 1. Speed and memory, every variant of conf/benchmark/gpu.yaml in one process (rows per variant).
timeout -k 10 "${GPU_BENCH_LIMIT_S:-300}" "$PYTHON" run.py mode=benchmark benchmark=gpu benchmark.name="$NAME" \
  benchmark.write=true benchmark.file="$FILE" \
  "${BENCH[@]}" hydra.run.dir="$OUT/benchmark" || failed "mode=benchmark benchmark=gpu" $? "$OUT/benchmark/run.log"

# 2. and 3. A short training run of the model through the real entry point, then mode=test on it.
DATA="$OUT/data"
COMMON=(dataset=demo "dataset.root=$DATA" "dataset.component_masks=$DATA/components_true" model.backbone.weights=random
        seed=0 logger=csv evaluation.calibration.images_per_class=8 "${RUN[@]}")
T0=$SECONDS
# (the checks below find what a failed run did not write)
"$PYTHON" run.py "${COMMON[@]}" trainer.max_steps="$STEPS" trainer.log_every_n_steps=1 \
  module.scheduler.warmup_steps=5 hydra.run.dir="$OUT/train" || STATUS=1
"$PYTHON" run.py mode=test "${COMMON[@]}" ckpt_path="$OUT/train/checkpoints/last.ckpt" hydra.run.dir="$OUT/test" \
  || STATUS=1
"$PYTHON" benchmarks/gpu_checks.py training --file "$FILE" --benchmark "$NAME" --train-dir "$OUT/train" \
  --test-dir "$OUT/test" --steps "$STEPS" --batch "$BATCH" --seconds $((SECONDS - T0)) "${FALLING[@]}" || STATUS=1

# 4. The same training run and test under trainer.precision=bf16-mixed.
T0=$SECONDS
"$PYTHON" run.py "${COMMON[@]}" trainer.precision=bf16-mixed trainer.max_steps="$STEPS" trainer.log_every_n_steps=1 \
  module.scheduler.warmup_steps=5 hydra.run.dir="$OUT/train_bf16" || STATUS=1
"$PYTHON" run.py mode=test "${COMMON[@]}" trainer.precision=bf16-mixed ckpt_path="$OUT/train_bf16/checkpoints/last.ckpt" \
  hydra.run.dir="$OUT/test_bf16" || STATUS=1
"$PYTHON" benchmarks/gpu_checks.py training --file "$FILE" --benchmark "$NAME" --precision bf16 --train-dir "$OUT/train_bf16" \
  --test-dir "$OUT/test_bf16" --steps "$STEPS" --batch "$BATCH" --seconds $((SECONDS - T0)) "${FALLING[@]}" || STATUS=1

# 5. Decisions that bf16 autocast changes (the demo model, fp32 calibration).
DECISIONS_RC=0
"$PYTHON" benchmarks/bf16_decisions.py --device "$PARITY_DEVICE" --root "$OUT/bf16_demo" > "$OUT/bf16_decisions.log" 2>&1 \
  || DECISIONS_RC=$?
"$PYTHON" benchmarks/gpu_checks.py note --file "$FILE" --benchmark "$NAME" --precision bf16 \
  --measurement "bf16 autocast decisions, demo test set" --log "$OUT/bf16_decisions.log" --rc "$DECISIONS_RC" || STATUS=1

# 6. The parity test with the model on this device.
PARITY_RC=0
ANOMALYMOE_PARITY_DEVICE="$PARITY_DEVICE" ANOMALYMOE_REQUIRE_FIXTURES=1 \
  "$PYTHON" -m pytest tests/test_parity.py -q -p no:cacheprovider "${PARITY[@]}" > "$OUT/parity.log" 2>&1 || PARITY_RC=$?
"$PYTHON" benchmarks/gpu_checks.py parity --file "$FILE" --benchmark "$NAME" --log "$OUT/parity.log" \
  --rc "$PARITY_RC" || STATUS=1

"$PYTHON" benchmarks/gpu_checks.py total --file "$FILE" --benchmark "$NAME" --seconds $((SECONDS - START))
echo "benchmarks/gpu.sh: done in $((SECONDS - START)) s; rows in $FILE$([[ $STATUS == 0 ]] || echo "; a step FAILED")" >&2
exit "$STATUS"
