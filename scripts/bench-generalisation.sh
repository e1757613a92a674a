#!/usr/bin/env bash
# The generalisation figures of the feature codec (docs/EVALUATION.md), end to end:
#   1. the leave-source-out bench (headline): palette levels, z unquantised, AVIF (and AVIF/JPEG of
#      the downscaled picture) on sources no training item comes from;
#   2. the same-site bench (later frames of a training video), reported apart;
#   3. leave-one-camera-out site adaptation: the generic codec never saw vtest.avi; `train --adapt`
#      on its first 58 %; generic and adapted scored on its last 30 %.
#
#   bash scripts/bench-generalisation.sh [ASSETS]   # default assets/codecs/fall-yolov8
#
# Needs the corpus (palettelink corpus) for the face-api and carphone eval sources; writes
# docs/results/{lso,same-site,adapt-vtest/{generic,adapted}}/ and builds bundles under .cache/lso-bundles.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. "${VENV:-.venv}/bin/activate"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-$PWD/.cache/ultralytics}
ASSETS=${1:-assets/codecs/fall-yolov8}
ROOT=.cache/lso-bundles
OUT=docs/results

palettelink corpus >/dev/null
# fp32 graphs: the codec is measured as trained; int8 retention is measured apart (palettelink int8)
palettelink build-bundle --out "$ROOT" --codec-assets "$ASSETS" --force --no-edge-int8 --no-server-int8
common=(--bundles "$ROOT" --bundle fall-yolov8/1 --no-samples --assets "$ASSETS" --codec palette)

palettelink bench "${common[@]}" --eval-set --ablations z-unquantised \
    --anchors avif,avif-down2,avif-down4,jpeg --out "$OUT/lso"
palettelink bench "${common[@]}" --same-site --ablations z-unquantised --anchors avif --out "$OUT/same-site"

# leave-one-camera-out adaptation on the held-out pedestrian camera
palettelink bench "${common[@]}" --eval-set --source vtest.avi --anchors avif --out "$OUT/adapt-vtest/generic"
palettelink train --adapt "$ROOT/fall-yolov8/1" --bundles "$ROOT" \
    --images /usr/share/doc/opencv-doc/examples/data/vtest.avi --span 0-0.58 --every 3 \
    --work .cache/adapt-vtest
adapted=$(ls -d "$ROOT"/fall-yolov8/* | sort -V | tail -1)
palettelink bench --bundles "$ROOT" --bundle "fall-yolov8/$(basename "$adapted")" --no-samples \
    --assets "$adapted/codec" --codec palette --eval-set --source vtest.avi --anchors avif \
    --out "$OUT/adapt-vtest/adapted" --compare-with "$OUT/adapt-vtest/generic/bench.json"
