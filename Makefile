# vmreplica — the two front-door commands are `make demo` and `make test`.
# Both run `make setup` first, which installs everything a fresh Debian machine lacks.

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-ha test lint bench bench-scale clean unit chaos

setup:
	bash scripts/setup.sh

# The demos are not part of the package: demo/ (run from here) over the test harness,
# tests/harness.
demo: setup
	$(PY) -m demo.replication

demo-ha: setup
	$(PY) -m demo.ha

# The static checks first (seconds): a lint or type error fails before the long suite.
test: lint
	bash scripts/run-tests.sh $(PYTEST_ARGS)

# ruff (rules in pyproject.toml) over the package, its tests (and their harness), the
# benchmarks and the demos; mypy over the package, the harness and the demos (its
# settings, and which files, in pyproject.toml).
lint: setup
	$(PY) -m ruff check src tests bench demo
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) bench/bench_cycle.py --work bench-run/cycle
	$(PY) bench/bench_continuous.py --work bench-run/continuous
	$(PY) bench/bench_floor.py
	$(PY) bench/bench_handshake.py
	$(PY) bench/bench_libvirt_cycle.py --work /tmp/vmr-bench-lvcycle
	$(PY) bench/soak_cycles.py --driver libvirt --minutes 3 --work bench-run/soak
	$(PY) bench/bench_scale.py --work bench-run/scale

# issue 20: N powered-off VMs at 30 s over H hours of history (VMS, HISTORY_H, MINUTES)
bench-scale: setup
	$(PY) bench/bench_scale.py --vms $${VMS:-100} --history-hours $${HISTORY_H:-48} \
		--minutes $${MINUTES:-5} --work bench-run/scale

# Crash states of replica heads (issue 16): STATES=N (default 1000), bounded; then the
# randomized fault soak of a replicated running VM: FAULTS=N (default 1000), bounded.
chaos: setup
	$(PY) bench/chaos_crash_states.py --states $${STATES:-1000}
	$(PY) bench/chaos_soak.py --faults $${FAULTS:-1000}

clean:
	rm -rf $(VENV) guest build demo-run bench-run
