#!/usr/bin/env bash
# Build the one-file edge binary and stream an image through it to a live server; report its size,
# cold start-up time and the time to fetch + stream and to stream one image.
#
#   bash scripts/check-edge-binary.sh [--no-build]
#
# Takes minutes (the build above all), so it is not part of scripts/test.sh; tests/test_edge_binary.py
# runs it when PALETTELINK_SLOW=1. Needs .venv (scripts/setup.sh) for the server and the sample image,
# and bundles/ (palettelink build-bundle --out bundles). The binary runs with a fresh HOME, an empty
# fetch cache and a minimal environment, so it fetches the bundle's edge part from the server and uses
# nothing of this checkout or .venv. As root, with the build root there, it then fetches and streams a
# third time inside the Debian 11 build root: the same file on glibc 2.31. Prints `edge-binary: ...` lines
# and ends with one JSON line; exit 0 when the binary printed boxes and exited 0 every time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=$ROOT/dist/palettelink-edge
VENV=${PALETTELINK_VENV:-$ROOT/.venv}
NICE="nice -n 19"

if [[ ${1:-} != --no-build ]]; then
    bash scripts/build-edge-binary.sh
fi
[[ -x $BIN ]] || { echo "edge-binary: $BIN missing (bash scripts/build-edge-binary.sh)" >&2; exit 2; }
[[ -d $ROOT/bundles/fall-yolov8 ]] || {
    echo "edge-binary: bundles/fall-yolov8 missing (palettelink build-bundle --out bundles)" >&2; exit 2; }

TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$TMP/home" "$TMP/tmp"

now() { date +%s.%N; }
ms() { python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) * 1000:.0f}')" "$1" "$2"; }
# A minimal environment: no venv, no PYTHONPATH, a fresh HOME (so the default cache is empty) and TMPDIR.
edge() { env -i PATH=/usr/bin:/bin HOME="$TMP/home" TMPDIR="$TMP/tmp" LANG=C.UTF-8 $NICE "$BIN" "$@"; }

SIZE=$(stat -c %s "$BIN")
echo "edge-binary: $BIN $SIZE bytes ($(python3 -c "print(f'{$SIZE / 1e6:.1f}')") MB)"

# Start-up: --version, the first run after the build (the page cache may hold the file, but every run
# of a one-file binary unpacks itself into a fresh folder under TMPDIR), then the best of three.
sync
t0=$(now); edge --version >"$TMP/version.txt"; t1=$(now)
START_FIRST=$(ms "$t0" "$t1")
START_BEST=$START_FIRST
for _ in 1 2 3; do
    t0=$(now); edge --version >/dev/null; t1=$(now)
    t=$(ms "$t0" "$t1"); (( t < START_BEST )) && START_BEST=$t
done
echo "edge-binary: $(cat "$TMP/version.txt"); --version wall time first ${START_FIRST} ms, best of 3 ${START_BEST} ms"

IMG=$("$VENV/bin/python" -m palettelink.samples | grep '/bus\.jpg$')
[[ -f $IMG ]] || { echo "edge-binary: no sample image bus.jpg" >&2; exit 2; }

# A real server on free loopback ports.
$NICE "$VENV/bin/palettelink-server" --bundles "$ROOT/bundles" --host 127.0.0.1 --grpc-port 0 --http-port 0 \
    >"$TMP/server.out" 2>"$TMP/server.err" &
SERVER_PID=$!
for _ in $(seq 1 600); do
    grep -q '^READY ' "$TMP/server.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "edge-binary: server died:" >&2; tail -20 "$TMP/server.err" >&2; exit 1; }
    sleep 0.5
done
READY=$(grep -m1 '^READY ' "$TMP/server.out") || { echo "edge-binary: server not READY in 300 s" >&2; exit 1; }
GRPC=$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$READY")
HTTP=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$READY")
echo "edge-binary: server $READY"

check_run() {  # $1: label, $2: output file, $3: rc
    echo "--- $1 (exit $3)"; cat "$2"
    if [[ $3 != 0 ]]; then echo "edge-binary: $1 exited $3" >&2; exit 1; fi
    grep -Eq '[1-9][0-9]* box\(es\)' "$2" || { echo "edge-binary: $1 printed no boxes" >&2; exit 1; }
    grep -Eq '^ +[A-Za-z].* +[0-9.]+ +\[' "$2" || { echo "edge-binary: $1 printed no box lines" >&2; exit 1; }
}

# 1) Fresh cache: fetch the edge part from the server, then stream bus.jpg.
rc=0; t0=$(now)
edge --fetch-bundle fall-yolov8 --server "$GRPC" --http "http://$HTTP" "$IMG" >"$TMP/fetch.out" 2>&1 || rc=$?
t1=$(now); FETCH_STREAM=$(ms "$t0" "$t1")
check_run "fetch + stream" "$TMP/fetch.out" "$rc"
ls "$TMP/home/.cache/palettelink/bundles/fall-yolov8" >/dev/null || {
    echo "edge-binary: nothing in the fresh HOME's cache" >&2; exit 1; }

# 2) The bundle now comes from the cache: start-up + bundle load + one image streamed.
rc=0; t0=$(now)
edge --bundle fall-yolov8 --server "$GRPC" "$IMG" >"$TMP/stream.out" 2>&1 || rc=$?
t1=$(now); STREAM=$(ms "$t0" "$t1")
check_run "stream (cached bundle)" "$TMP/stream.out" "$rc"
RTT=$(sed -n 's/.* rtt \([0-9.]*\) ms.*/\1/p' "$TMP/stream.out" | head -1)

# 3) On glibc 2.31: the same binary inside the Debian 11 build root of scripts/build-edge-binary.sh (it
#    shares this machine's network), fetch + stream again with an empty cache there. Needs root.
case $(uname -m) in x86_64) DEB_ARCH=amd64 ;; aarch64) DEB_ARCH=arm64 ;; *) DEB_ARCH=none ;; esac
BR=${PALETTELINK_EDGE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/palettelink/edge-build}/bullseye-$DEB_ARCH
OLD_GLIBC=skipped
if [[ $(id -u) == 0 && -x $BR/usr/bin/ldd ]]; then
    rm -rf "$BR/tmp/edge-check" && mkdir -p "$BR/tmp/edge-check/home" "$BR/tmp/edge-check/tmp"
    cp "$BIN" "$IMG" "$BR/tmp/edge-check/"
    OLD_GLIBC=$(chroot "$BR" ldd --version | head -1 | awk '{print $NF}')
    rc=0
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's: the root and the command
    unshare --mount --propagation private -- /bin/sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' \
        "$BR" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp/edge-check/home TMPDIR=/tmp/edge-check/tmp LANG=C.UTF-8 \
        nice -n 19 /tmp/edge-check/palettelink-edge --fetch-bundle fall-yolov8 --server "$GRPC" --http "http://$HTTP" \
        "/tmp/edge-check/$(basename "$IMG")" >"$TMP/oldglibc.out" 2>&1 || rc=$?
    check_run "fetch + stream on glibc $OLD_GLIBC (the Debian 11 build root)" "$TMP/oldglibc.out" "$rc"
    rm -rf "$BR/tmp/edge-check"
else
    echo "edge-binary: not run on glibc 2.31 (needs root and the build root $BR)"
fi

echo "edge-binary: size $SIZE B; start-up (--version) first ${START_FIRST} ms, best ${START_BEST} ms;" \
     "fetch + stream bus.jpg ${FETCH_STREAM} ms; stream bus.jpg (cached bundle, whole process) ${STREAM} ms;" \
     "frame rtt ${RTT} ms (all under nice -n 19); fetch + stream on the build root's glibc: ${OLD_GLIBC}"
printf '{"size_bytes": %s, "startup_first_ms": %s, "startup_best_ms": %s, "fetch_and_stream_ms": %s, "stream_ms": %s, "rtt_ms": %s, "ran_on_glibc": "%s"}\n' \
    "$SIZE" "$START_FIRST" "$START_BEST" "$FETCH_STREAM" "$STREAM" "${RTT:-null}" "$OLD_GLIBC"
