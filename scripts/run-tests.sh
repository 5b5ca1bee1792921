#!/bin/bash
# The test suite as CI and `make test` run it, with real daemons, QEMU and TLS on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1
# Two phases (tests/conftest.py says why): everything but the namespace clusters in two
# workers (VMREPLICA_TEST_WORKERS=0: one process; --dist loadgroup, whose groups pytest 9
# leaves inert: tests/conftest.py);
# then the clusters alone. Both phases always run; the exit status is the first failure's.
workers=${VMREPLICA_TEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadgroup)
fi
# pytest's exit status 5 is "no test selected" (a PYTEST_ARGS filter can leave a phase
# empty): not a failure.
run() { .venv/bin/python -m pytest -q -ra "$@" tests "${args[@]}" || { rc=$?; [ $rc -eq 5 ] || return $rc; }; }
args=("$@")
status=0
run --durations=25 "${parallel[@]}" -m "not cluster" || status=$?
run --durations=10 -m cluster || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"
