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
echo "mrm-fast installed in .venv from $wheel (extras: $extras)"
