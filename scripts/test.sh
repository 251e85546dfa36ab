#!/usr/bin/env bash
# Run the test suite: lint, then pytest. pytest's "no tests collected" (exit 5) is not a failure.
set -uo pipefail
venv=${VENV:-.venv}
"$venv/bin/ruff" check src tests bench || exit 1
"$venv/bin/pytest" -q -rs --durations=15 "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "no tests collected"
  exit 0
fi
exit $status
