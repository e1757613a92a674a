#!/usr/bin/env bash
# Serving frames/s per codec and task on one NVIDIA GPU, in under 5 minutes:
#   - fall-yolov8 (the YOLO split): every codec (palette, baseline, avif), detect, at batch 1 and with
#     dynamic batching (max_batch 8 and 32, 2 x max_batch callers), 3 runs of 4 s each;
#   - vision-image (the image codec and the model zoo): the palette and avif codecs, every task
#     (detect, segment, landmarks, pose, preview) at batch 1 and max_batch 16, 2 runs of 2 s each.
# Each row: the median of --repeat runs and their p10-p90 (palettelink bench-serve), the card, torch's
# and onnxruntime's threads and providers. JSON under $OUT (default docs/results/gpu).
#
#   bash scripts/bench-gpu.sh
#
# On a machine without a usable GPU it says so ("no GPU: ..."), falls back to the CPU and runs a
# short pass (fall-yolov8 only, batch 1), so the script itself is tested anywhere
# (tests/test_bench_gpu.py); those CPU figures are a smoke test, not a benchmark.
#
# Settings (environment): PALETTELINK_BUNDLES (bundle root; default bundles, built when missing),
# OUT, SECONDS_PER_RUN, SECONDS_IMAGE, REPEAT, DEVICE (default cuda; bench-serve falls back to the CPU
# itself where torch sees no GPU), SKIP_SETUP=1 (use the active environment).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${SKIP_SETUP:-} ]]; then
  # shellcheck disable=SC1091
  . "${VENV:-.venv}/bin/activate"
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$PWD/.cache/ultralytics}
ROOT=${PALETTELINK_BUNDLES:-bundles}
OUT=${OUT:-docs/results/gpu}
DEVICE=${DEVICE:-cuda}
started=$(date +%s)

gpu_problem() {  # prints why there is no usable GPU; nothing (status 1) when there is one
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi not found (no NVIDIA driver)"
  elif ! nvidia-smi -L >/dev/null 2>&1; then
    echo "nvidia-smi lists no GPU"
  elif ! python - <<'EOF' 2>/dev/null; then
import sys
import torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
    echo "torch $(python -c 'import torch; print(torch.__version__)' 2>/dev/null) cannot use the GPU"
  else
    return 1
  fi
}

if problem=$(gpu_problem); then
  echo "bench-gpu: no GPU: $problem; falling back to the CPU for a short smoke run (not GPU figures)"
  SECONDS_PER_RUN=${SECONDS_PER_RUN:-2}
  REPEAT=${REPEAT:-1}
  fallback=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/bench-gpu: GPU /'
  SECONDS_PER_RUN=${SECONDS_PER_RUN:-4}
  REPEAT=${REPEAT:-3}
  fallback=0
fi

if [[ ! -f $ROOT/fall-yolov8/1/manifest.json ]]; then
  echo "bench-gpu: building $ROOT/fall-yolov8/1"
  palettelink build-bundle --out "$ROOT" >/dev/null
fi
mkdir -p "$OUT"
common=(--bundles "$ROOT" --device "$DEVICE" --seconds "$SECONDS_PER_RUN" --repeat "$REPEAT" --warmup 1)

if (( fallback )); then
  palettelink bench-serve "${common[@]}" --bundle fall-yolov8 --codec palette --no-batching \
    --out "$OUT/bench-gpu-fallback.json"
else
  palettelink bench-serve "${common[@]}" --bundle fall-yolov8 --max-batch 8,32 --out "$OUT/fall-yolov8.json"
  if [[ ! -f $ROOT/vision-image/1/manifest.json ]]; then
    echo "bench-gpu: building $ROOT/vision-image/1"
    palettelink build-bundle --image --out "$ROOT" >/dev/null
  fi
  palettelink bench-serve "${common[@]}" --bundle vision-image --codec palette --codec avif \
    --max-batch 16 --repeat 2 --seconds "${SECONDS_IMAGE:-2}" --out "$OUT/vision-image.json"
fi
where=$DEVICE; (( fallback )) && where="cpu (no GPU)"
echo "bench-gpu: done in $(( $(date +%s) - started )) s on $where; JSON in $OUT"
