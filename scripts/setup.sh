#!/usr/bin/env bash
# Shared setup for scripts/demo.sh and scripts/test.sh: system packages (when root), .venv, Python
# packages. Idempotent: every step checks first and skips what is already in place, so a second run
# takes a second or two. Works on a fresh Debian 12 with python3.11 (set PYTHON to choose another).
#
#   bash scripts/setup.sh          # then: . .venv/bin/activate
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
say() { printf 'setup: %s\n' "$*"; }

# -- system packages: only what is missing, only as root, never fatal for optional ones ------------
if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
  missing=()
  for pkg in python3-venv openssl libglib2.0-0; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  # Optional: test videos/images (opencv-doc), training images (gnome-backgrounds), the compose
  # validator (docker-compose), shellcheck, promtool for the metrics and alert-rule checks (prometheus; under
  # systemd the package also starts a Prometheus on :9090: systemctl disable --now prometheus).
  [[ -d /usr/share/doc/opencv-doc/examples/data ]] || missing+=(opencv-doc)
  [[ -d /usr/share/backgrounds/gnome ]] || missing+=(gnome-backgrounds)  # training images
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] || missing+=(chromium chromium-driver)  # browser test
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)  # lint of the shell scripts the tests run
  if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null; then
      say "warning: apt-get could not install some of: ${missing[*]} (tests that need them will skip)"
    fi
  fi
elif ! command -v docker-compose >/dev/null 2>&1; then
  say "not root: skipping apt-get (docker-compose/opencv-doc stay missing if they are)"
fi

# -- python and the virtual environment ------------------------------------------------------------
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [[ -z $PYTHON ]] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: need Python ≥ 3.11 (python3.11 on PATH, or PYTHON=/path/to/python)" >&2
  exit 2
fi
if [[ ! -x $VENV/bin/python ]]; then
  say "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip_log=$(mktemp -t palettelink-setup.XXXXXX)
trap 'rm -f "$pip_log"' EXIT
pip() {  # pip install, quiet; its full output only when it fails
  if ! "$py" -m pip install "$@" >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    echo "setup: pip install $* failed" >&2
    exit 1
  fi
}

have() {  # have DIST VERSION-PREFIX: is the distribution installed (at that version)?
  "$py" - "$1" "${2:-}" <<'PY'
import importlib.metadata as m, sys
try:
    v = m.version(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v.split("+")[0].startswith(sys.argv[2]) else 1)
PY
}

# 1. everything from the committed lock (exact versions + sha256, scripts/lock.py): no resolver runs,
#    so a new upstream release changes nothing until the lock is updated on purpose. Redone only when
#    the lock or pyproject.toml changed (or the project stopped importing).
stamp="$VENV/.palettelink-setup"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] || ! have palettelink \
   || ! "$py" -c 'import edge.client, server, palettelink.bench' >/dev/null 2>&1; then
  # The locked install is about 6 GB (torch's CUDA build is the one this platform's torch 2.14 comes
  # as); say so before pip fills the disk halfway and stops with Errno 28.
  need_kb=$((6 * 1024 * 1024))
  free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  if ! have torch && ((free_kb < need_kb)); then
    echo "setup: the locked install needs about 6 GB free where $VENV lies; $((free_kb / 1024)) MB are free" >&2
    exit 1
  fi
  say "pip install --no-deps --require-hashes -r requirements.lock ($(grep -c '^[a-z]' requirements.lock) pins)"
  pip --no-deps --require-hashes --no-cache-dir -r requirements.lock
  # 2. the project itself, editable, with the locked setuptools (no isolated build env to resolve).
  say "pip install --no-deps --no-build-isolation -e ."
  pip --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

say "ready: $("$py" --version), torch $("$py" -c 'import importlib.metadata as m; print(m.version("torch"))'), venv $VENV"
