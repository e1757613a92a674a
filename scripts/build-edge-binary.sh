#!/usr/bin/env bash
# Build dist/palettelink-edge: the edge client + onnxruntime, grpcio, protobuf, OpenCV, constriction and
# numpy in one self-contained file (PyInstaller --onefile) that starts on glibc 2.31 and newer (Ubuntu
# 20.04 and 22.04, Debian 11, Raspberry Pi OS bullseye, Jetson's L4T R35), and is byte-identical when built
# twice from one commit.
#
#   sudo bash scripts/build-edge-binary.sh [--commit REV]   # root: it uses debootstrap and chroot
#
# Without --commit it packs the working tree's palettelink/ and edge/ (uncommitted edits included);
# with --commit it packs that commit's (git archive) and uses its requirements-edge.lock.
#
# How: a binary runs on the glibc it was linked against or a newer one, so the binary is built inside a
# Debian 11 (bullseye, glibc 2.31) root made with debootstrap from Debian's mirror:
#   1. the build root (once, with 2.: about 10 minutes on 2 cores): debootstrap bullseye + its security
#      updates, a C toolchain and the -dev packages CPython needs;
#   2. CPython 3.11 built there from Debian's python3.11 source package (the upstream 3.11.2 tarball plus Debian's backported security and crash fixes,
#      without Debian's layout patches) with a shared libpython, so libpython, the stdlib's extension
#      modules and the libraries they load (OpenSSL 1.1.1, libffi, zlib, bz2, lzma, libstdc++) all come
#      from bullseye;
#   3. a venv in that root with requirements-edge.lock (exact versions + sha256; the wheels are downloaded
#      here for manylinux <= 2.31, then installed in the root with --no-index) and PyInstaller (pinned,
#      hashed). The build fails if torch or ultralytics got in;
#   4. PyInstaller --onefile in the root, from a copy of palettelink/ and edge/ (working tree or commit);
#   5. scripts/check-glibc-floor.py on the result: the build fails when any ELF file in the binary (the
#      bootloader, and everything it unpacks) needs a glibc newer than 2.31.
# Reproducible: the same build root, fixed paths inside it (/build/...), PYTHONHASHSEED=0,
# SOURCE_DATE_EPOCH=the commit's time, TZ=UTC; scripts/check-edge-reproducible.sh builds one commit twice
# and compares.
#
# Environment: PALETTELINK_EDGE_BUILD_CACHE (default ~/.cache/palettelink/edge-build: the build root, shared
# by every checkout and CI on this machine; about 1.8 GB), PALETTELINK_EDGE_LOCK (default
# requirements-edge.lock; another CPU architecture needs its own lock: scripts/lock.py --out), PYTHON (the
# host's python3, for pip download and the glibc check only), PALETTELINK_DEBIAN_MIRROR. Runs under nice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
renice -n 19 -p $$ >/dev/null
umask 022
COMMIT=
while [[ $# -gt 0 ]]; do
    case $1 in
        --commit) COMMIT=$(git rev-parse --verify --quiet "${2:-}^{commit}") ||
                      { echo "build-edge-binary: --commit ${2:-}: not a commit" >&2; exit 2; }
                  shift 2 ;;
        *) echo "usage: sudo bash scripts/build-edge-binary.sh [--commit REV]" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
FLOOR=2.31                      # newest glibc the binary may need; checked at the end of every build
SUITE=bullseye                  # Debian 11: glibc 2.31
MIRROR=${PALETTELINK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${PALETTELINK_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ROOT_PACKAGES=build-essential,libssl-dev,zlib1g-dev,libffi-dev,libbz2-dev,liblzma-dev,xz-utils,dpkg-dev
# CPython: Debian bookworm's python3.11 source package (its orig tarball is upstream's Python-3.11.2.tgz).
PY_SRC_VERSION=3.11.2-6+deb12u8
PY_ORIG=python3.11_3.11.2.orig.tar.gz
PY_ORIG_SHA256=2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849
PY_PREFIX=/opt/python3.11
LOCK=${PALETTELINK_EDGE_LOCK:-requirements-edge.lock}
if [[ -n $COMMIT && -z ${PALETTELINK_EDGE_LOCK:-} ]]; then
    LOCK=$(mktemp)
    trap 'rm -f "$LOCK"' EXIT
    git show "$COMMIT:requirements-edge.lock" >"$LOCK"
fi
PYINSTALLER_PIN="pyinstaller==6.22.3"
HOOKS_PIN="pyinstaller-hooks-contrib==2026.9"
# PyInstaller and what it needs beyond the edge lock (packaging, setuptools are in it), hashed: x86_64 and
# aarch64 wheels of PyInstaller (its bootloader needs only GLIBC_2.14).
BUILD_TOOLS="$PYINSTALLER_PIN --hash=sha256:451a4ae14b719365bf1a2f0a99dae7b3463060061c3a394c70d5264cfb439528 --hash=sha256:312da84b4b31ab9750066a823734c11b7c68757fdd67c9f038bf19c330a954e4
$HOOKS_PIN --hash=sha256:fb3e67dd64122561724c48ad0366ac9e8c16e638b63bf7d85de03bf3fdbf06c3
altgraph==0.17.5 --hash=sha256:f3a22400bce1b0c701683820ac4f3b159cd301acab067c51c653e06961600597"

case $(uname -m) in
    x86_64) DEB_ARCH=amd64; WHEEL_ARCH=x86_64 ;;
    aarch64) DEB_ARCH=arm64; WHEEL_ARCH=aarch64 ;;
    *) echo "build-edge-binary: unsupported CPU architecture $(uname -m)" >&2; exit 2 ;;
esac
CACHE=${PALETTELINK_EDGE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/palettelink/edge-build}
BR=$CACHE/$SUITE-$DEB_ARCH      # the build root
[[ -f $LOCK ]] || { echo "build-edge-binary: $LOCK missing" >&2; exit 2; }
if [[ $(id -u) != 0 ]]; then
    echo "build-edge-binary: needs root (debootstrap and chroot build the binary in a Debian 11 root):" \
         "sudo bash scripts/build-edge-binary.sh" >&2
    exit 2
fi
for tool in debootstrap unshare chroot; do
    command -v "$tool" >/dev/null || {
        echo "build-edge-binary: $tool missing (apt-get install debootstrap util-linux coreutils)" >&2; exit 2; }
done
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9                          # one build at a time per build root

SDE=$(git log -1 --format=%ct "${COMMIT:-HEAD}" 2>/dev/null || echo 0)
# Run a command in the build root: a private mount namespace (its /proc goes away with it), a clean
# environment, the reproducibility settings.
in_root() {
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's: the root and the command
    unshare --mount --propagation private -- /bin/sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' \
        "$BR" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 TZ=UTC \
        SOURCE_DATE_EPOCH="$SDE" PYTHONHASHSEED=0 DEBIAN_FRONTEND=noninteractive "$@"
}

make_root() {  # 1. Debian 11 + its security updates + a C toolchain and the -dev packages CPython needs
    rm -rf "$BR"
    echo "build-edge-binary: creating the $SUITE build root $BR (debootstrap)" >&2
    debootstrap --variant=minbase --arch="$DEB_ARCH" --include="$ROOT_PACKAGES" "$SUITE" "$BR" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; return 1; }
    cat >"$BR/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $SECURITY_MIRROR $SUITE-security main
deb-src $MIRROR bookworm main
EOF
    cp /etc/resolv.conf "$BR/etc/resolv.conf"
    in_root /bin/bash -c 'apt-get -q update && apt-get -y -q upgrade && apt-get clean' >"$CACHE/apt.log" 2>&1 ||
        { tail -20 "$CACHE/apt.log" >&2; return 1; }
}

build_python() {  # 2. CPython 3.11 from Debian's source package, built in the root, installed to $PY_PREFIX
    echo "build-edge-binary: building CPython in the build root (log: $CACHE/python-build.log)" >&2
    rm -rf "$BR/build/python" "${BR:?}$PY_PREFIX"
    mkdir -p "$BR/build/python"
    cat >"$BR/build/python/build.sh" <<EOF
set -euo pipefail
cd /build/python
apt-get source -q --download-only python3.11=$PY_SRC_VERSION
echo "$PY_ORIG_SHA256  $PY_ORIG" | sha256sum -c --quiet
tar xzf $PY_ORIG
tar xJf python3.11_*.debian.tar.xz
cd Python-3.11.2
# Debian's backported upstream fixes (security, crashes): every patch from shutdown-deadlock.diff on, not
# the Debian layout patches before it.
apply=0
while read -r p _; do
    [[ \$p == shutdown-deadlock.diff ]] && apply=1
    [[ \$apply == 1 && -n \$p && \$p != \#* && \$p != skip-*tests* ]] || continue
    patch -p1 -s --no-backup-if-mismatch <../debian/patches/\$p
done <../debian/patches/series
[[ \$apply == 1 ]] || { echo "no shutdown-deadlock.diff in debian/patches/series" >&2; exit 1; }
./configure -q --prefix=$PY_PREFIX --enable-shared --with-ensurepip=no \
    OPT='-DNDEBUG -fwrapv -O2 -Wall' LDFLAGS='-Wl,-rpath,$PY_PREFIX/lib'
# The CVE-2026-4224 backport makes pyexpat.c use an internal header (Debian builds pyexpat into the core).
sed -i 's|^MODULE_PYEXPAT_CFLAGS=.*|& -DPy_BUILD_CORE_MODULE|' Makefile
make -s -j\$(nproc)
make -s install
$PY_PREFIX/bin/python3.11 -c 'import ssl, ctypes, zlib, bz2, lzma, _decimal, pyexpat, _elementtree; print("python:", ssl.OPENSSL_VERSION)'
EOF
    in_root /bin/bash /build/python/build.sh >"$CACHE/python-build.log" 2>&1 ||
        { tail -30 "$CACHE/python-build.log" >&2; return 1; }
    rm -rf "$BR/build/python/Python-3.11.2"
}

stamp() { sha256sum | cut -d' ' -f1; }
ROOT_STAMP=$( { declare -f make_root; echo "$SUITE $DEB_ARCH $MIRROR $ROOT_PACKAGES"; } | stamp)
PY_STAMP=$( { echo "$ROOT_STAMP"; declare -f build_python; echo "$PY_SRC_VERSION $PY_ORIG_SHA256"; } | stamp)
t0=$SECONDS
if [[ ! -f $BR/.palettelink-root-stamp || $(cat "$BR/.palettelink-root-stamp") != "$ROOT_STAMP" ]]; then
    make_root
    echo "$ROOT_STAMP" >"$BR/.palettelink-root-stamp"
fi
if [[ ! -f $BR/.palettelink-python-stamp || $(cat "$BR/.palettelink-python-stamp") != "$PY_STAMP" ]]; then
    rm -f "$BR/.palettelink-venv-stamp"
    build_python || {
        grep -q "Can not find version" "$CACHE/python-build.log" &&
            echo "build-edge-binary: python3.11 $PY_SRC_VERSION is no longer on the mirror: set PY_SRC_VERSION" \
                 "to the version 'apt-cache showsrc python3.11' lists for bookworm (a new CPython, a new sha256)" >&2
        exit 1
    }
    echo "$PY_STAMP" >"$BR/.palettelink-python-stamp"
    echo "build-edge-binary: build root and CPython ready in $((SECONDS - t0)) s" >&2
fi

# 3. The venv: the edge lock's wheels, downloaded here for manylinux <= FLOOR, installed in the root offline.
VENV_STAMP=$( { echo "$PY_STAMP"; cat "$LOCK"; echo "$BUILD_TOOLS"; } | stamp)
if [[ ! -f $BR/.palettelink-venv-stamp || $(cat "$BR/.palettelink-venv-stamp") != "$VENV_STAMP" ]]; then
    echo "build-edge-binary: creating the build venv in the build root (edge lock + PyInstaller)" >&2
    rm -rf "$BR/build/wheels" "$BR/opt/edge-venv"
    mkdir -p "$BR/build/wheels"
    cp "$LOCK" "$BR/build/requirements-edge.lock"
    echo "$BUILD_TOOLS" >"$BR/build/build-tools.lock"
    PLATFORMS=()
    for minor in $(seq "${FLOOR#2.}" -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_$WHEEL_ARCH"); done
    PLATFORMS+=(--platform "manylinux2014_$WHEEL_ARCH")
    "$PY" -m pip download -q --no-deps --require-hashes -r "$BR/build/requirements-edge.lock" \
        -r "$BR/build/build-tools.lock" -d "$BR/build/wheels" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 "${PLATFORMS[@]}" >"$CACHE/pip-download.log" 2>&1 ||
        { grep -v 'is ignored' "$CACHE/pip-download.log" >&2; exit 1; }
    PIP_WHEEL=$(cd "$BR/build/wheels" && ls pip-*.whl)
    in_root /bin/bash -c "cd /build && $PY_PREFIX/bin/python3.11 -m venv --without-pip /opt/edge-venv &&
        /opt/edge-venv/bin/python wheels/$PIP_WHEEL/pip install -q --no-index --find-links wheels \
        --no-deps --require-hashes -r requirements-edge.lock -r build-tools.lock"
    echo "$VENV_STAMP" >"$BR/.palettelink-venv-stamp"
fi
for forbidden in torch torchvision ultralytics; do
    if in_root /opt/edge-venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$forbidden') is None)"; then
        echo "build-edge-binary: $forbidden is installed in the build venv; the edge must not need it" >&2
        exit 1
    fi
done

# 4. PyInstaller in the root, from a copy of the edge client and runtime (fixed paths inside).
rm -rf "$BR/build/app" "$BR/build/work" "$BR/build/spec" "$BR/build/dist"
mkdir -p "$BR/build/app"
APP=(palettelink edge scripts/palettelink_edge_entry.py)
if [[ -n $COMMIT ]]; then
    echo "build-edge-binary: packing commit $COMMIT" >&2
    git archive "$COMMIT" "${APP[@]}" | tar -C "$BR/build/app" -xf -
else
    echo "build-edge-binary: packing the working tree (HEAD $(git rev-parse --short HEAD 2>/dev/null || echo -))" >&2
    tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - "${APP[@]}" | tar -C "$BR/build/app" -xf -
fi
# Hooks: pyinstaller-hooks-contrib covers onnxruntime (its provider .so), grpc (roots.pem) and cv2
# (config files, opencv_python_headless.libs); the --collect-* options make sure of the binaries and
# data of each, and of protobuf's upb extension and constriction's Rust extension. The codec registry
# finds its codecs with pkgutil at run time, so its submodules are collected explicitly: PyInstaller
# lists them by importing the package in a child process, which finds the copy via PYTHONPATH.
in_root /usr/bin/env PYTHONPATH=/build/app /opt/edge-venv/bin/pyinstaller \
    --onefile --noconfirm --clean --log-level WARN \
    --name palettelink-edge \
    --distpath /build/dist --workpath /build/work --specpath /build/spec \
    --paths /build/app \
    --collect-submodules palettelink.codecs \
    --add-data "/build/app/palettelink/data/samples:palettelink/data/samples" \
    --collect-binaries onnxruntime --collect-data onnxruntime \
    --collect-binaries grpc --collect-data grpc \
    --collect-binaries cv2 --collect-data cv2 \
    --collect-binaries constriction --hidden-import constriction \
    --hidden-import google._upb._message \
    --exclude-module torch --exclude-module torchvision --exclude-module ultralytics \
    --exclude-module server --exclude-module tkinter --exclude-module matplotlib \
    --exclude-module IPython --exclude-module pytest \
    /build/app/scripts/palettelink_edge_entry.py

mkdir -p "$ROOT/dist"
BIN=$ROOT/dist/palettelink-edge
cp "$BR/build/dist/palettelink-edge" "$BIN.tmp" && chmod 755 "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
"$BIN" --version
# 5. The glibc floor: every ELF file in the binary, the ones it unpacks included.
"$PY" "$ROOT/scripts/check-glibc-floor.py" --floor "$FLOOR" "$BIN" | tail -1
echo "build-edge-binary: $BIN ($(stat -c %s "$BIN") bytes, sha256 $(sha256sum "$BIN" | cut -d' ' -f1))"
