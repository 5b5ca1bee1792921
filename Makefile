# vmreplica — the two front-door commands are `make demo` and `make test`.
# Both run `make setup` first, which installs everything a fresh Debian machine lacks.

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo demo-ha test bench clean unit chaos

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m vmreplica.demo

demo-ha: setup
	$(PY) -m vmreplica.demo_ha

test: setup
	bash scripts/run-tests.sh $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) bench/bench_cycle.py --work bench-run/cycle
	$(PY) bench/bench_continuous.py --work bench-run/continuous
	$(PY) bench/bench_floor.py
	$(PY) bench/soak_cycles.py --driver libvirt --minutes 3 --work bench-run/soak

# Crash states of replica heads (issue 16): STATES=N (default 1000), bounded; then the
# randomized fault soak of a replicated running VM: FAULTS=N (default 1000), bounded.
chaos: setup
	$(PY) bench/chaos_crash_states.py --states $${STATES:-1000}
	$(PY) bench/chaos_soak.py --faults $${FAULTS:-1000}

clean:
	rm -rf $(VENV) guest build demo-run bench-run
