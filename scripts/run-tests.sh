#!/bin/bash
# The test suite as CI and `make test` run it: unit tests first (seconds), then the
# integration and end-to-end tests with real daemons, QEMU and TLS on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
.venv/bin/python -m pytest -q -ra --durations=15 tests "$@"
