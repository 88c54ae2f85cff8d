#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: Rust unit/property tests, the wheel in a
# numpy-only environment (no torch), and pytest against the independent references.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test (mrm-core)"
cargo test -p mrm-core --release --quiet

echo "== lint (Rust): cargo fmt --check, clippy -D warnings"
cargo fmt --all --check
cargo clippy -p mrm-core -p mrm-py --release --all-targets --quiet -- -D warnings

echo "== build and install (.venv, extras: test)"
MRM_EXTRAS=test MRM_WITH_SMOLLM=1 bash scripts/setup.sh

echo "== the abi3 wheel in a fresh numpy-only environment"
smoke_env="$(mktemp -d)/venv"
.venv/bin/python -m venv "$smoke_env"
"$smoke_env/bin/python" -m pip install -q dist/mrm_fast-*.whl
"$smoke_env/bin/python" tests/wheel_smoke.py
rm -rf "$(dirname "$smoke_env")"

echo "== lint (Python): ruff"
.venv/bin/python -m ruff check python tests benches examples

echo "== pytest"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating this as a failure" >&2
    exit 1
fi
exit "$status"
