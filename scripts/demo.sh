#!/usr/bin/env bash
# Sets everything up and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
MRM_EXTRAS="${MRM_EXTRAS:-torch}" bash scripts/setup.sh
.venv/bin/python examples/quickstart.py "$@"
