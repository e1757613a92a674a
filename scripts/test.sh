#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint and run the whole test suite. Extra arguments go to pytest.
#
#   bash scripts/test.sh              bash scripts/test.sh -k edge -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

echo "test: ruff check"
ruff check .

echo "test: pytest"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "test: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
