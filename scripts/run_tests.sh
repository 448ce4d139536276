#!/usr/bin/env bash
# Run the test suite: idempotent set-up (scripts/setup.sh), then pytest from the repository root.
# Extra arguments go to pytest, e.g. `scripts/run_tests.sh -m "not slow"` or `scripts/run_tests.sh tests/x.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
rc=0
# One worker per core (tests use one torch thread each); `-n 0` runs them in this process (pdb, -s).
.venv/bin/python -m pytest -q -n auto "$@" || rc=$?
if [ "$rc" -eq 5 ]; then  # pytest: no tests were collected
  echo "no tests collected"
  rc=0
fi
exit "$rc"
