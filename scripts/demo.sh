#!/usr/bin/env bash
# PaletteLink end to end on this machine: set up, build the bundles if missing, start the server, then
# stream the sample images through the edge client:
#   - COCO detection (the default: the image bundle, vision-image) at three levels of that bundle's
#     default codec (AVIF since issue 16 measured it above the palette image codec; the edge's codec
#     column says which) and a bpp target, then each other task of that one stream once: segment,
#     landmarks, pose, preview;
#   - the person/fall detector (fall-yolov8, a YOLO split) at 8 bits (baseline) and palette levels 0, 2.
#
#   bash scripts/demo.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

ROOT=${PALETTELINK_BUNDLES:-bundles}
COCO=vision-image
FALL=fall-yolov8
has_palette() { grep -q '"palette"' "$ROOT/$1/1/manifest.json" 2>/dev/null; }
if [[ ! -f $ROOT/$FALL/1/manifest.json ]] || { [[ -f assets/codecs/$FALL/codec.json ]] && ! has_palette "$FALL"; }; then
  echo "demo: building bundle $ROOT/$FALL/1 (front, tail and the trained palette codec)"
  palettelink build-bundle --out "$ROOT" --force
fi
if [[ ! -f $ROOT/$COCO/1/manifest.json ]]; then
  echo "demo: building bundle $ROOT/$COCO/1 (the image codec and the model zoo's task models)"
  palettelink build-bundle --image --out "$ROOT" --force
fi
palettelink info --bundles "$ROOT"

log=$(mktemp -t palettelink-server.XXXXXX.log)
palettelink-server --bundles "$ROOT" --grpc-port 0 --http-port 0 >"$log" 2>&1 &
server_pid=$!
stop_server() {
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    echo "demo: server stopped"
  fi
  rm -f "$log"
}
trap stop_server EXIT
trap 'exit 130' INT TERM

grpc=""
for _ in $(seq 1 360); do  # up to 3 minutes for torch and the bundle to load
  if ready=$(grep -m1 '^READY ' "$log"); then
    grpc=$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$ready")
    http=$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$ready")
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "demo: the server exited before it was ready:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
if [[ -z $grpc ]]; then
  echo "demo: the server did not get ready in time:" >&2
  cat "$log" >&2
  exit 1
fi
echo "demo: server ready: gRPC $grpc, dashboard http://$http/"

# Never take a path from the stdout of something that imports ultralytics: it prints a first-run banner.
mapfile -t samples < <(python -m palettelink.samples)
if ((${#samples[@]} < 2)); then
  echo "demo: sample images not found (is ultralytics installed in ${VENV:-.venv}?)" >&2
  exit 1
fi
work=$(mktemp -d -t palettelink-demo.XXXXXX)
face=$(python -m palettelink.samples --face "$work")
edge() { palettelink-edge --server "$grpc" --bundles "$ROOT" "$@"; }

for level in 0 2 4; do
  echo
  echo "== COCO detection ($COCO), level $level of the bundle's default codec (0 = finest) =="
  edge --bundle "$COCO" --level "$level" "${samples[@]}"
done
echo
echo "== COCO detection ($COCO), rate control: --target-bpp 0.05 (finest level within the budget) =="
edge --bundle "$COCO" --target-bpp 0.05 "${samples[@]}"
echo
echo "== segment ($COCO), level 0: person masks =="
edge --bundle "$COCO" --task segment --level 0 "${samples[@]}"
echo
echo "== landmarks ($COCO), level 0: faces and their 468 points =="
edge --bundle "$COCO" --task landmarks --level 0 "$face"
echo
echo "== pose ($COCO), level 0: 17 keypoints per person =="
edge --bundle "$COCO" --task pose --level 0 "${samples[@]}"
echo
echo "== preview ($COCO), level 0: the picture rebuilt from the same stream =="
edge --bundle "$COCO" --task preview --level 0 --preview "$work/previews" "${samples[@]}"
echo "demo: previews written to $work/previews"

echo
echo "== fall detector ($FALL), baseline codec, 8 bits per value =="
edge --bundle "$FALL" --codec baseline --bits 8 "${samples[@]}"
if has_palette "$FALL"; then
  for level in 0 2; do
    echo
    echo "== fall detector ($FALL), palette codec, level $level (0 = finest) =="
    edge --bundle "$FALL" --codec palette --level "$level" "${samples[@]}"
  done
fi
echo
echo "demo: done (try: palettelink bench-tasks --bundles $ROOT; the dashboard: palettelink-server)"
