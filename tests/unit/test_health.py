from vmreplica.domain import health


def _rel(**kw):
    rel = {"role": "primary", "state": "replicating", "frequency": 30, "last_success_at": 1000,
           "consecutive_failures": 0, "created_at": 0, "vm": "v"}
    rel.update(kw)
    return rel


def test_health_levels_and_reasons():
    assert health.assess(_rel(), 1010).level == "normal"
    h = health.assess(_rel(), 1100)
    assert h.level == "warning" and any("lag" in r for r in h.reasons)
    h = health.assess(_rel(consecutive_failures=1, last_error="cannot reach site-b"), 1010)
    assert h.level == "warning" and "cannot reach site-b" in h.reasons[0]
    h = health.assess(_rel(consecutive_failures=2, last_error="cannot reach site-b"), 1010)
    assert h.level == "critical" and "cannot reach site-b" in " ".join(h.reasons)
    assert health.assess(_rel(state="suspended"), 0).level == "critical"
    assert health.assess(_rel(state="resync_required"), 1010).level == "warning"
    h = health.assess(_rel(state="resync_required", resync_window="01:00-02:00",
                           resync_window_missed=True), 1010)
    assert h.level == "critical" and "window" in h.reasons[0]
    assert health.assess(_rel(fenced="site-b took over"), 0).level == "critical"


def test_thresholds_are_configurable():
    rel = _rel(consecutive_failures=2, last_error="x")
    assert health.assess(rel, 1010, thresholds={"failures_critical": 3}).level == "warning"
    assert health.assess(_rel(), 1070, thresholds={"lag_warning_factor": 3}).level == "normal"


def test_missed_cycles_in_12h():
    now = 100_000.0
    cycles = [{"started_at": now - 60 * i, "finished_at": now - 60 * i + 2, "ok": 1,
               "raw_bytes": 1000 * i, "wire_bytes": 10 * i, "kind": "delta"} for i in range(10)]
    cycles.append({"started_at": now - 30, "finished_at": now - 29, "ok": 0, "error": "boom",
                   "kind": "delta"})
    rel = _rel(frequency=30, created_at=now - 600, last_success_at=now)
    stats = health.measure(rel, cycles, now)
    assert stats["expected_cycles"] == 20 and stats["missed_cycles"] == 10
    assert stats["errors"] == 1 and stats["max_cycle_bytes"] == 9000
    assert stats["avg_cycle_seconds"] == 2.0 and stats["throughput_bps"] == 45000 // 20
    h = health.assess(rel, now, stats)
    assert h.level == "warning" and "cycles missed" in h.reasons[0]


def test_fewer_points_than_asked():
    rel = {"role": "replica", "state": "replicating", "history": 4, "points_count": 1,
           "point_interval": 60, "replicating_since": 0, "vm": "v"}
    h = health.assess(rel, 10_000)
    assert h.level == "warning" and "1 recovery point(s), 4 asked for" in h.reasons
