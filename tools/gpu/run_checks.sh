#!/usr/bin/env bash
# The GPU checks in one command, each step under its own time limit (about 8 minutes in all):
#
#   bash tools/gpu/run_checks.sh OUT             # GPU machine, after tools/gpu/stage.sh of every transfer
#   bash tools/gpu/run_checks.sh --dry-run OUT   # every step at tiny sizes on a CPU (CI)
#
# Results: OUT/summary.md, OUT/summary.json, OUT/<step>.json and .md, OUT/logs/<step>.log.
# See tools/gpu/checks.py for the steps, and docs/gpu.md for the procedure.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" tools/gpu/checks.py "$@"
