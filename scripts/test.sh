#!/usr/bin/env bash
# Run the test suite: lint, then pytest. pytest's "no tests collected" (exit 5) is not a failure.
set -uo pipefail
venv=${VENV:-.venv}
"$venv/bin/ruff" check src tests bench || exit 1
# guest images, dumps and their corrupted copies need room: say how much there is, before and after
df -h "${TMPDIR:-/tmp}" "$HOME" 2>/dev/null | sed 's/^/disk before: /'
free_kb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
if [ "${free_kb:-0}" -lt $((12 * 1024 * 1024)) ]; then
  echo "warning: less than 12 GiB free under ${TMPDIR:-/tmp}; the suite's guest dumps may not fit" >&2
fi
"$venv/bin/pytest" -q -rs --durations=15 "$@"
status=$?
df -h "${TMPDIR:-/tmp}" 2>/dev/null | sed 's/^/disk after: /'
if [ $status -eq 5 ]; then
  echo "no tests collected"
  exit 0
fi
exit $status
