#!/usr/bin/env bash
# Build the one-file edge binary twice from one commit (default HEAD, resolved once: git archive, so edits
# in the working tree or a commit landing between the builds change nothing) and check that the two files
# are byte-identical and that neither needs a glibc newer than the floor (scripts/check-glibc-floor.py).
#
#   sudo bash scripts/check-edge-reproducible.sh [REV]
#
# Each build after the first (which makes the build root: about 10 minutes) takes about 2 minutes, so
# scripts/test.sh does not run this; `PALETTELINK_SLOW=1 pytest tests/test_edge_binary.py` does. When the
# files differ it names the archive members that differ. Ends with one JSON line; exit 0 when identical.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
BIN=$ROOT/dist/palettelink-edge
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
REV=$(git rev-parse --verify "${1:-HEAD}^{commit}")

bash scripts/build-edge-binary.sh --commit "$REV"
cp "$BIN" "$TMP/first"
bash scripts/build-edge-binary.sh --commit "$REV"
FIRST=$(sha256sum "$TMP/first" | cut -d' ' -f1)
SECOND=$(sha256sum "$BIN" | cut -d' ' -f1)
SIZE=$(stat -c %s "$BIN")
echo "edge-reproducible: first  $FIRST"
echo "edge-reproducible: second $SECOND"
"$PY" "$ROOT/scripts/check-glibc-floor.py" --json "$BIN" >"$TMP/glibc.json" || true
NEWEST=$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["newest_glibc"], r["ok"])' "$TMP/glibc.json")
IDENTICAL=false
if [[ $FIRST == "$SECOND" ]]; then
    IDENTICAL=true
else
    # Which members of the appended archive differ (the check script reads PyInstaller's CArchive).
    "$PY" - "$TMP/first" "$BIN" <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("floor", Path("scripts/check-glibc-floor.py"))
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)
a, b = (dict(floor.pyinstaller_entries(Path(p)) or []) for p in sys.argv[1:3])
for name in sorted(set(a) | set(b)):
    if a.get(name) != b.get(name):
        print(f"edge-reproducible: differs: {name}")
EOF
fi
printf '{"commit": "%s", "sha256_first": "%s", "sha256_second": "%s", "identical": %s, "size_bytes": %s, "newest_glibc": "%s", "glibc_ok": %s}\n' \
    "$REV" "$FIRST" "$SECOND" "$IDENTICAL" "$SIZE" "${NEWEST% *}" "$([[ ${NEWEST#* } == True ]] && echo true || echo false)"
[[ $IDENTICAL == true && ${NEWEST#* } == True ]]
