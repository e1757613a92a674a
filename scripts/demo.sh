#!/usr/bin/env bash
# PaletteLink end to end on this machine: set up, build the bundle if missing, start the server, stream
# the two sample images through the edge client at 8, 6 and 4 bits (baseline) and at three palette
# levels plus a bpp target (palette codec), stop the server.
#
#   bash scripts/demo.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

ROOT=${PALETTELINK_BUNDLES:-bundles}
BUNDLE=fall-yolov8
has_palette() { grep -q '"palette"' "$ROOT/$BUNDLE/1/manifest.json" 2>/dev/null; }
if [[ ! -f $ROOT/$BUNDLE/1/manifest.json ]] || { [[ -f assets/codecs/$BUNDLE/codec.json ]] && ! has_palette; }; then
  echo "demo: building bundle $ROOT/$BUNDLE/1 (front, tail and the trained palette codec)"
  palettelink build-bundle --out "$ROOT" --force
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
for bits in 8 6 4; do
  echo
  echo "== baseline codec, $bits bits per value =="
  palettelink-edge --server "$grpc" --bundle "$BUNDLE" --bundles "$ROOT" --codec baseline --bits "$bits" \
    "${samples[@]}"
done
if has_palette; then
  for level in 0 2 4; do
    echo
    echo "== palette codec, level $level (0 = finest) =="
    palettelink-edge --server "$grpc" --bundle "$BUNDLE" --bundles "$ROOT" --codec palette --level "$level" \
      "${samples[@]}"
  done
  echo
  echo "== palette codec, rate control: --target-bpp 0.03 (finest level within the budget) =="
  palettelink-edge --server "$grpc" --bundle "$BUNDLE" --bundles "$ROOT" --codec palette --target-bpp 0.03 \
    "${samples[@]}"
fi
echo
echo "demo: done (try: palettelink bench --bundles $ROOT)"
