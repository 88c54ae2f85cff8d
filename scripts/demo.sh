#!/usr/bin/env bash
# Sets everything up and runs the main job: `mrm demo` on MovieLens-100K (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
MRM_EXTRAS="${MRM_EXTRAS:-torch}" bash scripts/setup.sh
export HF_HUB_OFFLINE=1  # every model comes from an installed package; never reach for a hub
.venv/bin/mrm demo "$@"
