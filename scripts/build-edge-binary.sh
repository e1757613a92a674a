#!/usr/bin/env bash
# Build dist/palettelink-edge: the edge client + onnxruntime, grpcio, protobuf, OpenCV, constriction and
# numpy in one self-contained file (PyInstaller --onefile). Linux binaries run on the same CPU
# architecture and a glibc at least as new as the build machine's.
#
#   bash scripts/build-edge-binary.sh
#
# The build venv (.cache/edge-build-venv) gets only requirements-edge.lock (the core dependencies + the
# `edge` extra at the locked versions) and PyInstaller; the project itself is not installed there (PyInstaller
# reads palettelink/ and edge/ from this checkout), and the build fails if torch or ultralytics got in.
# The venv is reused while the edge lock and the pins below are unchanged. The build runs under nice.
#
# Environment: PYTHON (default python3, >= 3.11 with its shared libpython: on Debian `apt-get install
# libpython3.11`), PALETTELINK_BUILD_VENV (default .cache/edge-build-venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${PALETTELINK_BUILD_VENV:-$ROOT/.cache/edge-build-venv}
PYINSTALLER_PIN="pyinstaller==6.22.3"
HOOKS_PIN="pyinstaller-hooks-contrib==2026.9"
STAMP=$VENV/.palettelink-stamp
WANT_STAMP="$({ cat requirements-edge.lock; echo "$PYINSTALLER_PIN $HOOKS_PIN"; } | sha256sum | cut -d' ' -f1)"

if [[ ! -x $VENV/bin/pyinstaller || ! -f $STAMP || $(cat "$STAMP") != "$WANT_STAMP" ]]; then
    echo "build-edge-binary: creating $VENV (core + edge extra + PyInstaller)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # The edge's packages from the committed edge lock (exact versions + sha256), then PyInstaller.
    nice -n 19 "$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r requirements-edge.lock
    nice -n 19 "$VENV/bin/python" -m pip install -q "$PYINSTALLER_PIN" "$HOOKS_PIN"
    echo "$WANT_STAMP" >"$STAMP"
fi
for forbidden in torch torchvision ultralytics; do
    if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$forbidden') is None)"; then
        echo "build-edge-binary: $forbidden is installed in $VENV; the edge must not need it" >&2
        exit 1
    fi
done

WORK=$ROOT/.cache/pyinstaller
# Hooks: pyinstaller-hooks-contrib covers onnxruntime (its provider .so), grpc (roots.pem) and cv2
# (config files, opencv_python_headless.libs); the --collect-* options make sure of the binaries and
# data of each, and of protobuf's upb extension and constriction's Rust extension. The codec registry
# finds its codecs with pkgutil at run time, so its submodules are collected explicitly: PyInstaller
# lists them by importing the package in a child process, which finds this checkout via PYTHONPATH.
PYTHONPATH=$ROOT nice -n 19 "$VENV/bin/pyinstaller" --onefile --noconfirm --clean --log-level WARN \
    --name palettelink-edge \
    --distpath "$ROOT/dist" --workpath "$WORK/work" --specpath "$WORK" \
    --paths "$ROOT" \
    --collect-submodules palettelink.codecs \
    --add-data "$ROOT/palettelink/data/samples:palettelink/data/samples" \
    --collect-binaries onnxruntime --collect-data onnxruntime \
    --collect-binaries grpc --collect-data grpc \
    --collect-binaries cv2 --collect-data cv2 \
    --collect-binaries constriction --hidden-import constriction \
    --hidden-import google._upb._message \
    --exclude-module torch --exclude-module torchvision --exclude-module ultralytics \
    --exclude-module server --exclude-module tkinter --exclude-module matplotlib \
    --exclude-module IPython --exclude-module pytest \
    scripts/palettelink_edge_entry.py

BIN=$ROOT/dist/palettelink-edge
"$BIN" --version
echo "build-edge-binary: $BIN ($(stat -c %s "$BIN") bytes)"
