#!/usr/bin/env bash
# The default configuration end to end (issue 17), on the leave-source-out frames:
#   1. what the product runs by default: the bundle built as `build-bundle` builds it (int8 edge and
#      server graphs where they pass their rules), the edge graph on the frame's window at every level,
#      the server's own onnxruntime path (--precision auto --server-precision auto --canvas window);
#   2. the float pipeline on the same windows (fp32 at both ends), beside it.
#
#   bash scripts/bench-deployed.sh [ASSETS]   # default assets/codecs/fall-yolov8
#
# Needs the corpus (palettelink corpus) for the face-api and carphone eval sources; writes
# docs/results/lso-deployed/{,float-window/} and builds the bundle under .cache/deployed-bundles.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. "${VENV:-.venv}/bin/activate"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$PWD/.cache/ultralytics}
ASSETS=${1:-assets/codecs/fall-yolov8}
ROOT=.cache/deployed-bundles
OUT=docs/results/lso-deployed

palettelink corpus >/dev/null
palettelink build-bundle --out "$ROOT" --codec-assets "$ASSETS" --force
common=(--bundles "$ROOT" --bundle fall-yolov8/1 --codec palette --eval-set --anchors '' --canvas window)
palettelink bench "${common[@]}" --precision auto --server-precision auto --out "$OUT"
palettelink bench "${common[@]}" --precision fp32 --server-precision fp32 --out "$OUT/float-window"
