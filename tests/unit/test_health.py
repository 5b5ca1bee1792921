import dataclasses

from vmreplica.domain import health, schedule
from vmreplica.domain.relationship import Relationship


def _cycle(**kw):
    return health.CycleRecord(**{"id": 0, "vm": "v", "cycle": 0, **kw})


def _rel(**kw):
    fields = {"role": "primary", "state": "replicating", "frequency": 30,
              "last_success_at": 1000, "consecutive_failures": 0, "created_at": 0, "vm": "v",
              "id": "r1", "peer": "site-b"}
    fields.update(kw)
    return Relationship(**fields)


def test_health_levels_and_reasons():
    assert health.assess(_rel(), 1010).level == "normal"
    h = health.assess(_rel(), 1100)
    assert h.level == "warning" and any("lag" in r for r in h.reasons)
    h = health.assess(_rel(consecutive_failures=1, last_error="cannot reach site-b"), 1010)
    assert h.level == "warning" and "cannot reach site-b" in h.reasons[0]
    h = health.assess(_rel(consecutive_failures=2, last_error="cannot reach site-b"), 1010)
    assert h.level == "critical" and "cannot reach site-b" in " ".join(h.reasons)
    # Suspended is the operator's choice, not a failure: a warning (issue 17: it was
    # critical), with the reason and the way back.
    h = health.assess(_rel(state="suspended"), 0)
    assert h.level == "warning" and "suspended by the operator" in h.reasons[0]
    assert "resume" in h.reasons[0]
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
    # Judged: the 20 slots of the last 600 s that are over (now is when the next one is
    # due); a good cycle ran in every other one.
    now = schedule.slot_time("v", 30, 3334)
    cycles = [_cycle(started_at=now - 30 - 60 * i, finished_at=now - 28 - 60 * i, ok=1,
                     raw_bytes=1000 * i, wire_bytes=10 * i, kind="delta") for i in range(10)]
    cycles.append(_cycle(started_at=now - 60, finished_at=now - 59, ok=0, error="boom",
                         kind="delta"))
    rel = _rel(frequency=30, created_at=now - 600, last_success_at=now)
    stats = health.measure(rel, cycles, now)
    assert stats["expected_cycles"] == 20 and stats["missed_cycles"] == 10
    assert stats["errors"] == 1 and stats["max_cycle_bytes"] == 9000
    assert stats["avg_cycle_seconds"] == 2.0 and stats["throughput_bps"] == 45000 // 20
    h = health.assess(rel, now, stats)
    assert h.level == "warning" and "cycles missed" in h.reasons[0]


def test_a_good_cycle_clears_the_last_cycle_error():
    """Issue 17: the dashboard's "last cycle error" stayed after a good cycle."""
    now = 100_000.0
    failed = _cycle(started_at=now - 60, finished_at=now - 59, ok=0, error="boom",
                    kind="delta")
    good = _cycle(started_at=now - 30, finished_at=now - 29, ok=1, raw_bytes=1, kind="delta")
    rel = _rel(created_at=now - 600, last_success_at=now - 29)
    stats = health.measure(rel, [failed], now)
    assert stats["last_error"] == "boom"
    stats = health.measure(rel, [good, failed], now)          # newest first, as stored
    assert stats["last_error"] is None and stats["errors"] == 1
    assert stats["last_failure"] == {"at": now - 60, "error": "boom"}


def test_continuous_mode_has_no_schedule_to_miss():
    now = 100_000.0
    rel = _rel(mode="continuous", sync_state="in_sync", created_at=now - 3600,
               last_success_at=now - 100)
    stats = health.measure(rel, [], now)
    assert stats["expected_cycles"] == 0 and stats["missed_cycles"] == 0
    assert health.assess(rel, now, stats).level == "normal"     # no lag while in sync
    rel = _rel(role="replica", mode="continuous", sync_state="degraded",
               sync_reason="the replica went away", created_at=now - 3600)
    h = health.assess(rel, now, health.measure(rel, [], now))
    assert h.level == "warning" and "degraded: the replica went away" in h.reasons[0]


def test_fewer_points_than_asked():
    rel = _rel(role="replica", history=4, points_count=1, point_interval=60,
               replicating_since=0)
    h = health.assess(rel, 10_000)
    assert h.level == "warning" and "1 recovery point(s), 4 asked for" in h.reasons


def test_every_error_code_comes_back_as_its_own_class():
    """The client maps a daemon's error code back to its class: a full replica storage
    reached the primary as a plain OperationError (issue 16, defect 10)."""
    from vmreplica import errors

    def every(cls):
        return [cls] + [c for s in cls.__subclasses__() for c in every(s)]
    for cls in every(errors.VmreplicaError):
        if cls.__module__ != "vmreplica.errors":
            continue
        back = errors.from_json(cls("m", hint="h").to_json())
        assert type(back) is cls and back.message == "m" and back.hint == "h"
    assert isinstance(errors.from_json({"code": "storage_full", "message": "full"}),
                      errors.StorageFull)


def test_a_full_replica_storage_is_critical_at_once_on_the_primary():
    rel = _rel(consecutive_failures=1, last_error_code="storage_full",
               last_success_at=None,
               last_error="the replica storage /srv/b on site-b is full")
    h = health.assess(rel, 100.0)
    assert h.level == "critical" and "storage is full" in h.reasons[0]
    assert "/srv/b" in h.reasons[0]


def test_a_staged_cycle_not_applied_is_critical_on_the_replica():
    rel = _rel(role="replica", last_success_at=None,
               apply_pending={"cycle": 4, "error": "the replica storage /srv/b on site-b is "
                              "full: cycle 4 is staged but not applied (1.0 MiB free, about "
                              "60.0 MiB needed for it)"})
    h = health.assess(rel, 100.0)
    assert h.level == "critical" and "60.0 MiB needed" in h.reasons[0]


def test_a_failed_re_ip_is_a_warning_not_more():
    rec = {"vm": "v", "for": "failover", "state": "failed", "message": "no interface with MAC "
           "52:54:00:00:00:01 in the guest"}
    rel = _rel(role="replica", state="failed_over", last_success_at=None, reip=rec)
    h = health.assess(rel, 100.0)
    assert h.level == "warning" and h.reasons == [
        "re-IP of v failed: no interface with MAC 52:54:00:00:00:01 in the guest"]
    for state in ("waiting", "done"):
        assert health.assess(dataclasses.replace(rel, reip=dict(rec, state=state)),
                             100.0).level == "normal"
