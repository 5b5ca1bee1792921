"""Issue 20: the cycle history in the store (service.store): the schema migration, the
rollup of old cycles into per-hour aggregates, the pruning of events, and `measure`
across the boundary. A real SQLite store in a temporary directory; times injected."""

from __future__ import annotations

import sqlite3

from vmreplica.service.store import SCHEMA_VERSION, Store


def test_an_older_database_gets_the_new_columns(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO settings VALUES ('schema_version', '1');
        CREATE TABLE cycles (
            id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, cycle INTEGER NOT NULL,
            kind TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, ok INTEGER,
            raw_bytes INTEGER DEFAULT 0, wire_bytes INTEGER DEFAULT 0,
            extents INTEGER DEFAULT 0, error TEXT);
        INSERT INTO cycles(vm, cycle, kind, started_at, finished_at, ok)
            VALUES ('v', 1, 'delta', 100.0, 101.0, 1);
    """)
    db.commit()
    db.close()
    store = Store(path)
    assert store.get_setting("schema_version") == SCHEMA_VERSION
    [old] = store.cycles("v")
    assert old.slot is None and old.finished_at == 101.0
    row = store.start_cycle("v", 2, "delta", slot=130.0)
    store.finish_cycle(row, True, 10, 5, 1)
    assert store.cycles("v")[0].slot == 130.0
    store.close()
    Store(path).close()          # a second open finds nothing to do


# -- bounded history: rollup, prune, measure across the boundary -------------------------

import math  # noqa: E402
import random  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

from vmreplica.domain import health, history, schedule  # noqa: E402
from vmreplica.domain.relationship import Relationship  # noqa: E402
from vmreplica.service import scheduler as scheduler_module  # noqa: E402
from vmreplica.service import store as store_module  # noqa: E402
from vmreplica.service.monitor import HISTORY_HOURS  # noqa: E402

NOW = 1_765_000_000.0 + 1234.5       # not on an hour


def _rel(vm="v", frequency=30, since=None, **kw) -> Relationship:
    return Relationship(vm=vm, id=f"id-{vm}", role="primary", peer="site-b",
                        state="replicating", frequency=frequency,
                        created_at=since or NOW - 40 * 3600,
                        replicating_since=since or NOW - 40 * 3600,
                        last_success_at=NOW - 5, last_attempt_at=NOW - 5, **kw)


def _fill(store: Store, vm: str, start: float, end: float, frequency: int = 30,
          seed: int = 1) -> None:
    """Scheduled cycles on the VM's slots from ``start`` to ``end`` through the store's
    own interface: 1 in 17 fails, 1 in 23 starts 3 s late, sizes and durations vary."""
    rand = random.Random(seed)
    k = schedule.slot_index(vm, frequency, start) + 1
    with store.unsynced():
        while schedule.slot_time(vm, frequency, k) < end:
            due = schedule.slot_time(vm, frequency, k)
            t = due + (3.0 if k % 23 == 0 else rand.uniform(0.01, 0.4))
            row = store.start_cycle(vm, k, "delta", slot=due, at=t)
            if k % 17 == 0:
                store.finish_cycle(row, False, error=f"boom {k}", at=t + 1.5)
            else:
                size = rand.randrange(1, 4 << 20)
                store.finish_cycle(row, True, size, size // 3, 5,
                                   at=t + rand.uniform(0.2, 6.0))
            k += 1


def _history(store: Store, vm: str, now: float, hours: int = HISTORY_HOURS) -> dict:
    since = history.hour_of(now - hours * 3600)
    return history.total(vm, store.cycle_hours(vm, since), since)


def test_rollup_keeps_a_day_in_full_then_hours_and_measure_is_the_same_across(tmp_path):
    path = tmp_path / "state.db"
    store = Store(path)
    _fill(store, "v", NOW - 30 * 3600, NOW)
    _fill(store, "w", NOW - 30 * 3600, NOW, frequency=300, seed=2)
    rel = _rel()
    all_rows = store.cycles("v", limit=100_000)
    w_rows = len(store.cycles("w", limit=100_000))
    assert len(all_rows) >= 30 * 120 - 2
    before_hist = _history(store, "v", NOW)
    before_12h = store.cycle_stats(rel, NOW)
    assert before_12h == health.measure(rel, all_rows, NOW)
    assert before_hist["cycles"] + before_hist["failures"] == len(all_rows)
    assert before_hist["late"] == sum(1 for c in all_rows if history.is_late(c)) > 0

    rolled = store.roll_up(NOW)
    cut = history.hour_of(NOW - store_module.CYCLES_KEPT)
    kept = store.cycles("v", limit=100_000)
    assert rolled == len(all_rows) - len(kept) + w_rows - len(store.cycles("w", 100_000))
    assert min(c.started_at for c in kept) >= cut                 # a day in full...
    assert max(c.started_at for c in all_rows if c not in kept) < cut
    assert 5 * 3600 < cut - min(c.started_at for c in all_rows)   # ...older ones rolled
    assert store.roll_up(NOW) == 0                                # nothing twice
    # `measure` reads the same across the boundary: the 12 h figures (a fresh store:
    # its running aggregates are loaded from the rows kept) and the 48 h history.
    assert _history(store, "v", NOW) == before_hist
    assert _history(Store(path), "v", NOW) == before_hist
    assert Store(path).cycle_stats(rel, NOW) == before_12h
    per_hour = before_hist["per_hour"]
    assert [h["hour"] for h in per_hour] == sorted({history.hour_of(c.started_at)
                                                     for c in all_rows})
    # The per-hour aggregates are kept 90 days, then dropped.
    later = NOW + store_module.HOURS_KEPT + 3 * 86400
    store.roll_up(later)
    assert store.cycles("v") == [] and store.cycle_hours("v", 0) == []
    assert store.cycle_hours("w", 0) == []


def test_the_scheduler_prunes_events_after_30_days_and_rolls_cycles_up_hourly(tmp_path,
                                                                             monkeypatch):
    store = Store(tmp_path / "state.db")
    for age_days in (40, 31, 29, 1):
        monkeypatch.setattr(store_module, "time",
                            types.SimpleNamespace(time=lambda a=age_days: NOW - a * 86400))
        store.add_event("cycle", f"{age_days} days old", "v")
    monkeypatch.undo()
    _fill(store, "v", NOW - 26 * 3600, NOW)
    sched = scheduler_module.Scheduler(types.SimpleNamespace(store=store))
    done = sched.keep_history(NOW)
    assert done["events_purged"] == 2 and done["cycles_rolled_up"] > 0
    assert [e["message"] for e in store.events("v")] == ["29 days old", "1 days old"]


# -- running aggregates: health and status without a scan --------------------------------

def _same(a: dict, b: dict) -> None:
    """The figures of the scan and of the running aggregates: equal (the averages to
    their rounding: the running sum is kept in microseconds)."""
    assert a.keys() == b.keys()
    for k, value in a.items():
        if k in ("avg_cycle_seconds", "throughput_bps") and value is not None:
            assert b[k] == pytest.approx(value, rel=1e-3, abs=1e-3), k
        else:
            assert value == b[k], k


@pytest.mark.parametrize("frequency", [30, 300])
def test_running_aggregates_give_todays_health_without_a_scan(tmp_path, frequency):
    """A VM's cycles written one by one through the store over 20 h (scheduled ones on
    their slots, some late, failed, skipped or long; manual syncs; a running cycle):
    at every step the figures and health from the store's running aggregates equal
    health.measure/assess on the rows, and reading them runs no query on the cycles."""
    store = Store(tmp_path / "state.db")
    vm = "db1"
    rel = _rel(vm, frequency, since=NOW - 20 * 3600)
    store.cycle_stats(rel, NOW - 20 * 3600)          # loaded before the first cycle
    rand = random.Random(frequency)
    queries: list[str] = []
    store._db.set_trace_callback(queries.append)
    t = NOW - 20 * 3600 + 1
    k = schedule.slot_index(vm, frequency, t) + 1
    n = 0
    now = t            # (the window is read at times that do not go back, as a clock's)
    with store.unsynced():
        while t < NOW:
            due = schedule.slot_time(vm, frequency, k)
            roll = rand.random()
            if roll < 0.05:                              # missed slot
                k += 1
                continue
            kind, slot = ("delta", due)
            if roll < 0.10:
                kind, slot = (rand.choice(["delta", "resync"]), None)   # unscheduled
                due += rand.uniform(1, frequency - 1)
            start = due + (rand.uniform(1.5, 5) if roll > 0.95 else rand.uniform(0, 0.4))
            row = store.start_cycle(vm, k, kind, slot=slot, at=start)
            n += 1
            if n % 50 == 0:                              # seen while it runs
                queries.clear()
                now = max(now, start + 0.1)
                running = store.cycle_stats(rel, now)
                assert not [q for q in queries if "cycles" in q], queries
                rows = store.cycles(vm, limit=100_000)
                assert rows[0].ok is None
                _same(health.measure(rel, rows, now), running)
            ok = rand.random() > 0.08
            end = start + rand.uniform(0.1, frequency * (2.5 if roll > 0.98 else 0.3))
            if ok:
                store.finish_cycle(row, True, rand.randrange(1 << 22), 1000, 3, at=end)
            else:
                store.finish_cycle(row, False, error=f"failed {n}", at=end)
            rel = Relationship(**{**rel.__dict__, "last_success_at": end if ok else
                                  rel.last_success_at,
                                  "consecutive_failures": 0 if ok else
                                  rel.consecutive_failures + 1,
                                  "unscheduled_until": schedule.unscheduled_cover(
                                      kind, end, frequency) if slot is None and ok else
                                  rel.unscheduled_until})
            t = end
            k = max(k + 1, schedule.slot_index(vm, frequency, end) + 1)
            if slot is None and ok:          # the scheduler skips the slots it covers
                k = max(k, math.ceil((rel.unscheduled_until - schedule.phase(vm, frequency))
                                     / frequency))
            now = max(now, end + rand.uniform(0, frequency))
            queries.clear()
            running = store.cycle_stats(rel, now)
            assert not [q for q in queries if "cycles" in q], queries
            if n % 7 == 0 or now > NOW - 600:
                scanned = health.measure(rel, store.cycles(vm, limit=100_000), now)
                _same(scanned, running)
                assert health.assess(rel, now, scanned) == health.assess(rel, now, running)
    assert n > 100
    assert running["missed_cycles"] > 0 and running["errors"] > 0, (running, rel)


def test_a_window_counts_what_left_it_out():
    """The 12 h window forgets what started before it; maxima come back down."""
    vm, f = "v", 30
    w = history.CycleWindow(vm, f)
    rel = _rel(vm, f, since=NOW - 24 * 3600)
    big = health.CycleRecord(id=1, vm=vm, cycle=1, kind="delta",
                             started_at=NOW - 12 * 3600 - 10, finished_at=NOW - 12 * 3600,
                             ok=1, raw_bytes=10 << 20)
    small = health.CycleRecord(id=2, vm=vm, cycle=2, kind="delta", started_at=NOW - 100,
                               finished_at=NOW - 99, ok=1, raw_bytes=1 << 20)
    w.add(big)
    w.add(small)
    m = w.measure(rel, NOW - 200)
    assert m["cycles"] == 2 and m["max_cycle_bytes"] == 10 << 20
    m = w.measure(rel, NOW)
    assert m["cycles"] == 1 and m["max_cycle_bytes"] == 1 << 20 and len(w) == 1
    assert m == health.measure(rel, [small, big], NOW)
    assert m["expected_cycles"] == math.floor(12 * 3600 / f) - 1 or \
        m["expected_cycles"] == math.floor(12 * 3600 / f)


def test_the_dashboards_hour_chart_reads_rolled_up_and_full_hours_alike(tmp_path):
    import re

    from vmreplica.web.pages import _hours_chart
    store = Store(tmp_path / "state.db")
    _fill(store, "v", NOW - 40 * 3600, NOW)
    before = _hours_chart(dict(_history(store, "v", NOW), hours=HISTORY_HOURS))
    assert store.roll_up(NOW) > 0
    hist = dict(_history(store, "v", NOW), hours=HISTORY_HOURS)
    after = _hours_chart(hist)
    assert after == before
    bars = re.findall(r'<rect class="hour[^"]*" data-hour="[^"]+" data-bytes="(\d+)"', after)
    assert len(bars) == len(hist["per_hour"]) == 41          # 40 h and the current one
    assert sum(int(b) for b in bars) == hist["bytes_raw"] > 0
    assert 'class="hour failures"' in after
