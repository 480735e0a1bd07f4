#!/usr/bin/env bash
# Run the whole test suite in the project venv. Fails when pytest collects no test (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}; shift || true
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 100 ))}
export PYTHONHASHSEED=0
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider test "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[test] pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
