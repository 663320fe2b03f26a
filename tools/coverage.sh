#!/usr/bin/env bash
# Line coverage of src/clusterctl: runs the hermetic suite (a plain `python -m pytest`, which
# deselects the `real` tests), or pytest with the arguments given, under coverage, then prints
# the report. Subprocesses (`python -m clusterctl.cli ...`) are measured too (pyproject.toml
# [tool.coverage]). The data stays in build/coverage/, so `python3 -m coverage report -m` or
# `python3 -m coverage html` can be run afterwards.
#   tools/coverage.sh                                   # the hermetic suite
#   tools/coverage.sh tests/unit/test_changes.py        # some tests
#   tools/coverage.sh -m "real or not real"             # everything (the assets from tools/test.sh)
# Exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import coverage' 2>/dev/null; then
  echo "coverage.sh: coverage is not installed: pip install -e '.[test]'" >&2
  exit 2
fi

python3 -m coverage erase
status=0
python3 -m coverage run -m pytest "$@" || status=$?
python3 -m coverage combine --quiet
python3 -m coverage report
exit "$status"
