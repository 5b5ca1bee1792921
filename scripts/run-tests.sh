#!/bin/bash
# The test suite as CI and `make test` run it: unit tests first (seconds), then the
# integration and end-to-end tests with real daemons, QEMU and TLS on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
# Two workers (VMREPLICA_TEST_WORKERS=0: none), tests grouped as tests/conftest.py says.
workers=${VMREPLICA_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadgroup)
fi
.venv/bin/python -m pytest -q -ra --durations=25 "${parallel[@]}" tests "$@"
