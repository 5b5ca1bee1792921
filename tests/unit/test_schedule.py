"""Issue 20: cycles anchored to the clock. The real scheduler's decisions
(service.scheduler.Scheduler.run_due) under a fake clock, judged by health's own
counting (domain.health.assess on the running aggregates of domain.history, checked
equal to domain.health.measure on the rows).

The simulation: the scheduler's loop passes every tick (0.5 s) plus the pass's own
time; a cycle it starts runs for the time the test gives it and, as
primary.cycle.run_cycle does, sets ``last_attempt_at`` and ``last_success_at`` when it
ends. The store is a dict of Relationship values; the threads are fakes that stay alive
until their cycle's end on the fake clock.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import threading
import types

import pytest

from vmreplica.domain import health, history, schedule
from vmreplica.domain.relationship import Relationship
from vmreplica.service import scheduler as scheduler_module

T0 = 1_760_000_000.25       # when the initial copy ended (replicating since)
TICK = 0.5


class Store:
    """The parts of service.store.Store that run_due uses."""

    def __init__(self, rels: list[Relationship]):
        self.rels = {r.vm: r for r in rels}

    def relationships(self) -> list[Relationship]:
        return list(self.rels.values())

    def update_relationship(self, vm: str, **changes) -> Relationship:
        self.rels[vm] = dataclasses.replace(self.rels[vm], **changes)
        return self.rels[vm]


class Sim:
    def __init__(self, monkeypatch, vms: list[str], duration, frequency: int = 30,
                 seed: int = 20, t0: float = T0, initial: float = 3.0):
        self.now = t0
        self.frequency = frequency
        self.rand = random.Random(seed)
        self.duration = duration            # (vm, n) -> seconds the n-th cycle takes
        # Each VM's initial copy ran for ``initial`` seconds and ended at t0 (as
        # primary.cycle.run_cycle records it: an unscheduled cycle covers the slots
        # after it, domain.schedule.unscheduled_cover).
        self.store = Store([Relationship(
            vm=vm, id=f"id-{vm}", role="primary", peer="site-b", state="replicating",
            frequency=frequency, created_at=t0 - 60 - initial, replicating_since=t0,
            last_attempt_at=t0, last_success_at=t0 - initial,
            unscheduled_until=schedule.unscheduled_cover("initial", t0, frequency))
            for vm in vms])
        # (start, end, kind, slot): every cycle, the initial copy first
        self.runs: dict[str, list[tuple[float, float, str, float | None]]] = {
            vm: [(t0 - initial, t0, "initial", None)] for vm in vms}
        # the running aggregates the daemon judges health on (domain.history), fed as
        # the store feeds them: a cycle added as it starts, finished as it ends
        self.windows = {vm: history.CycleWindow.of(vm, frequency, self.history(vm))
                        for vm in vms}
        self.in_flight: dict[str, tuple[float, str, float | None]] = {}  # vm -> end, ...
        self.waiting: dict[str, float] = {}   # vm -> the slot of a cycle waiting for its lock
        sim = self

        class Thread:
            def __init__(self, target, args=(), name="", daemon=None):
                self.target, self.args, self.vm = target, args, args[0]

            def start(self):
                self.target(*self.args)

            def is_alive(self):
                # the scheduler's thread: waiting for the VM's lock, or running its cycle
                return self.vm in sim.waiting or (
                    self.vm in sim.in_flight and sim.in_flight[self.vm][2] is not None)

        class Scheduler(scheduler_module.Scheduler):
            def _cycle(self, vm, slot):
                sim.start_cycle(vm, slot)

        monkeypatch.setattr(scheduler_module, "threading",
                            types.SimpleNamespace(Thread=Thread, Event=threading.Event))
        self.scheduler = Scheduler(types.SimpleNamespace(store=self.store))

    def scheduled(self, vm: str) -> list[tuple[float, float, str, float | None]]:
        return [r for r in self.runs[vm] if r[3] is not None]

    def start_cycle(self, vm: str, slot: float | None, kind: str = "delta",
                    seconds: float | None = None) -> None:
        if vm in self.in_flight:               # the VM's lock is held: wait for it
            assert slot is not None
            self.waiting[vm] = slot
            return
        start = self.now + self.rand.uniform(0.001, 0.02)     # the thread starts
        n = len(self.scheduled(vm))
        end = start + (self.duration(vm, n) if seconds is None else seconds)
        self.runs[vm].append((start, end, kind, slot))
        self.in_flight[vm] = (end, kind, slot)
        self.windows[vm].add(health.CycleRecord(id=len(self.runs[vm]) - 1, vm=vm, cycle=0,
                                                kind=kind, started_at=start, slot=slot))

    def manual(self, vm: str, seconds: float) -> None:
        """`vmreplica sync VM` now: a cycle outside the schedule."""
        self.start_cycle(vm, None, "delta", seconds)

    def step(self) -> None:
        """One pass of the scheduler's loop: cycles that ended are recorded (as run_cycle
        does; a cycle waiting for the lock then runs, or finds its slot covered), then
        run_due."""
        self.now += TICK + self.rand.uniform(0.001, 0.05)
        for vm, (end, kind, slot) in list(self.in_flight.items()):
            if end <= self.now:
                del self.in_flight[vm]
                self.windows[vm].finish(len(self.runs[vm]) - 1, ok=1, finished_at=end)
                cover = {} if slot is not None else {
                    "unscheduled_until": schedule.unscheduled_cover(kind, end,
                                                                    self.frequency)}
                rel = self.store.update_relationship(vm, last_attempt_at=end,
                                                     last_success_at=end, **cover)
                waiting = self.waiting.pop(vm, None)
                if waiting is not None and not (
                        rel.unscheduled_until and waiting < rel.unscheduled_until - 1e-3):
                    self.start_cycle(vm, waiting)
        self.scheduler.run_due(self.now)

    def history(self, vm: str) -> list[health.CycleRecord]:
        """The cycles as the store lists them at ``now``: newest first, running ones
        without an outcome."""
        return [health.CycleRecord(id=i, vm=vm, cycle=i, kind=kind, started_at=s,
                                   finished_at=e if e <= self.now else None,
                                   ok=1 if e <= self.now else None, slot=slot)
                for i, (s, e, kind, slot) in reversed(list(enumerate(self.runs[vm])))
                if s <= self.now]

    def health(self, vm: str) -> tuple[dict, health.Health]:
        """Health as the daemon judges it, on the running aggregates; the same as
        health.measure on the rows."""
        rel = self.store.rels[vm]
        stats = self.windows[vm].measure(rel, self.now)
        scanned = health.measure(rel, self.history(vm), self.now)
        assert stats["avg_cycle_seconds"] == pytest.approx(scanned["avg_cycle_seconds"],
                                                           abs=1e-3)
        assert dict(stats, avg_cycle_seconds=0) == dict(scanned, avg_cycle_seconds=0)
        return stats, health.assess(rel, self.now, stats)


def _slot_of(vm: str, t: float) -> int:
    return schedule.slot_index(vm, 30, t)


def test_the_schedule_does_not_drift_1000_cycles_0_missed(monkeypatch):
    """Cycles of 0.1-5 s at 30 s: every slot gets its cycle, started within it (within
    a pass of its due time), and health counts 0 missed."""
    vm = "web1"
    rand = random.Random(1)
    sim = Sim(monkeypatch, [vm], lambda vm, n: rand.uniform(0.1, 5.0))
    while len(sim.scheduled(vm)) < 1000:
        sim.step()
    starts = [r[0] for r in sim.scheduled(vm)]
    slots = [_slot_of(vm, s) for s in starts]
    assert slots == list(range(slots[0], slots[0] + 1000))      # one per slot, none skipped
    late = [s - schedule.slot_time(vm, 30, k) for s, k in zip(starts, slots, strict=True)]
    assert max(late) < TICK + 0.1                                # started on time
    stats, h = sim.health(vm)
    assert stats["expected_cycles"] >= 999 and stats["missed_cycles"] == 0
    assert h.level == "normal", h.reasons


def test_an_overrun_cycle_runs_once_late_then_the_schedule_goes_on(monkeypatch):
    """The 10th cycle takes 70 s: the slots it passed get one late cycle, started as it
    ends, then cycles are back on their slots; no burst."""
    vm = "web1"
    sim = Sim(monkeypatch, [vm], lambda vm, n: 70.0 if n == 9 else 1.0)
    while len(sim.scheduled(vm)) < 20:
        sim.step()
    starts = [r[0] for r in sim.scheduled(vm)]
    long_start, long_end = sim.scheduled(vm)[9][:2]
    late = [s for s in starts if s - schedule.slot_at(vm, 30, s) > TICK + 0.1]
    assert late == [starts[10]]                                  # exactly one late cycle
    assert long_end <= starts[10] < long_end + TICK + 0.1        # as soon as it could
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > 15                                        # no burst
    slots = [_slot_of(vm, s) for s in starts]
    k = _slot_of(vm, long_start)
    assert slots[9:12] == [k, k + 2, k + 3]       # slot k+1 lost to the overrun, then on
    assert slots[11:] == list(range(k + 3, k + 3 + 9))
    stats, _ = sim.health(vm)
    assert stats["missed_cycles"] == 1


def test_100_vms_at_30s_are_spread_across_the_period(monkeypatch):
    """100 VMs whose initial copies ended together do not start their cycles together."""
    vms = [f"vm{i:03d}" for i in range(100)]
    sim = Sim(monkeypatch, vms, lambda vm, n: 1.0)
    while sim.now < T0 + 60:
        sim.step()
    firsts = [sim.scheduled(vm)[0][0] for vm in vms]
    per_second = collections.Counter(int(t) for t in firsts)
    assert len(per_second) >= 25 and max(per_second.values()) <= 10
    # Stable: the same spread on every host and run (not Python's salted hash).
    assert schedule.phase("vm000", 30) == schedule.phase("vm000", 30)
    assert len({schedule.phase(vm, 900) for vm in vms}) >= 95


@pytest.mark.parametrize("initial", [3.0, 40.0])
@pytest.mark.parametrize("first_slot_after", [0.3, 10.0, 29.7])
def test_a_new_vm_is_never_warned_for_cycles_it_could_not_have_run(monkeypatch,
                                                                    first_slot_after,
                                                                    initial):
    """A VM whose initial copy ended at t0 and that runs every cycle on time is normal
    at every pass of its first 20 slots (it used to turn warning at its fifth expected
    cycle), wherever its first slot falls after t0, however long the initial copy took;
    its first scheduled cycle comes at least one frequency after the initial copy ended
    (it could come right after it), and no slot counts as missed."""
    vm = "new1"
    t0 = schedule.slot_time(vm, 30, 58_666_667) - first_slot_after
    rand = random.Random(int(first_slot_after))
    sim = Sim(monkeypatch, [vm], lambda vm, n: rand.uniform(0.1, 5.0), t0=t0,
              initial=initial)
    seen_five = False
    while sim.now < t0 + 20 * 30:
        sim.step()
        stats, h = sim.health(vm)
        assert h.level == "normal", (sim.now - t0, h.reasons)
        seen_five = seen_five or stats["expected_cycles"] >= 5
    assert seen_five
    first = sim.scheduled(vm)[0][0]
    assert 30 <= first - t0 < 60 + TICK + 0.1
    assert stats["missed_cycles"] == 0


@pytest.mark.parametrize("offset", [2.0, 5.0, 14.0, 16.0, 25.0, 29.0])
def test_a_manual_sync_stands_for_its_slot_and_no_scheduled_cycle_races_it(monkeypatch,
                                                                           offset):
    """`sync` run ``offset`` s into a slot (2 s long; at 29 s it is still running when
    the next slot is due, and the scheduled cycle waits for the VM's lock): the next
    scheduled cycle starts at least half a period after the manual one ended (the slot
    due sooner is skipped: the manual cycle stands for it), at most 1.5 periods after,
    on its slot; health stays normal and counts no missed slot."""
    vm = "web1"
    sim = Sim(monkeypatch, [vm], lambda vm, n: 1.0)
    while len(sim.scheduled(vm)) < 5:
        sim.step()
    k = _slot_of(vm, sim.now)
    while sim.now < schedule.slot_time(vm, 30, k) + offset:
        sim.step()
    sim.manual(vm, 2.0)
    manual_start, manual_end = sim.runs[vm][-1][:2]
    while len(sim.scheduled(vm)) < 15:
        sim.step()
        stats, h = sim.health(vm)
        assert h.level == "normal", (sim.now - manual_end, h.reasons)
    after = [r[0] for r in sim.scheduled(vm) if r[0] > manual_start]
    assert 15 <= after[0] - manual_end <= 45 + TICK + 0.1
    assert after[0] - schedule.slot_at(vm, 30, after[0]) < TICK + 0.1      # on its slot
    assert [_slot_of(vm, t) for t in after] == list(range(_slot_of(vm, after[0]),
                                                          _slot_of(vm, after[0]) + 10))
    assert stats["missed_cycles"] == 0


def test_due_slot_rules():
    vm, f = "web1", 30
    s = schedule.slot_time(vm, f, 100)
    assert schedule.due_slot(vm, f, s + 3, last_slot=None, last_attempt=None) == s
    # The initial copy (no scheduled cycle yet) covers the slot it ended in.
    assert schedule.due_slot(vm, f, s + 20, last_slot=None, last_attempt=s + 2) is None
    assert schedule.due_slot(vm, f, s + 31, last_slot=None, last_attempt=s + 2) == s + 30
    # A manual sync (last_attempt moved, last_slot not) does not take the slot's place.
    assert schedule.due_slot(vm, f, s + 31, last_slot=s, last_attempt=s + 30.5) == s + 30
    assert schedule.due_slot(vm, f, s + 29, last_slot=s, last_attempt=s + 2) is None
    # A cycle run outside the schedule covers the slots due before unscheduled_until:
    # an initial copy ended at s + 2 a whole frequency, a manual sync half of one.
    cover = schedule.unscheduled_cover("initial", s + 2, f)
    assert cover == s + 32
    assert schedule.due_slot(vm, f, s + 31, last_slot=None, last_attempt=s + 2,
                             unscheduled_until=cover) is None
    assert schedule.due_slot(vm, f, s + 61, last_slot=None, last_attempt=s + 2,
                             unscheduled_until=cover) == s + 60
    cover = schedule.unscheduled_cover("delta", s + 20, f)
    assert cover == s + 35
    assert schedule.due_slot(vm, f, s + 31, last_slot=s, last_attempt=s + 20,
                             unscheduled_until=cover) is None
    assert list(schedule.covered_slots(vm, f, "delta", s + 20)) == [100, 101]
    assert list(schedule.covered_slots(vm, f, "delta", s + 5)) == [100]
    assert list(schedule.covered_slots(vm, f, "initial", s + 5)) == [100, 101]
    # Restarted or resumed (last_attempt None): at once, whatever ran before.
    assert schedule.due_slot(vm, f, s + 29, last_slot=s, last_attempt=None) == s
    # Judged: slots due at or after `since` and over by `now`.
    assert list(schedule.judged_slots(vm, f, s + 1, s + 61)) == [101]
    assert list(schedule.judged_slots(vm, f, s, s + 59)) == [100]
    assert len(schedule.judged_slots(vm, f, s + 1, s + 2)) == 0


def test_run_cycle_does_not_run_a_scheduled_cycle_whose_slot_a_manual_one_covered(tmp_path):
    """primary.cycle.run_cycle, given its slot by the scheduler, finds (under the VM's
    lock, after a manual sync that held it) the slot covered and runs nothing: no cycle
    row, no new cycle number; a slot not covered goes on into the cycle (and fails here
    at once: this host has no driver)."""
    import contextlib

    from vmreplica.primary.cycle import run_cycle
    from vmreplica.service.store import Store

    store = Store(tmp_path / "state.db")
    vm = "web1"
    s = schedule.slot_time(vm, 30, 100)
    store.add_relationship(Relationship(
        vm=vm, id="id-web1", role="primary", peer="site-b", state="replicating",
        frequency=30, cycle=7, bitmap="b7",
        unscheduled_until=schedule.unscheduled_cover("delta", s + 20, 30)))
    host = types.SimpleNamespace(store=store, vm_lock=lambda vm: contextlib.nullcontext())
    assert run_cycle(host, vm, slot=s + 30) == {"vm": vm, "skipped": True, "slot": s + 30}
    assert store.cycles(vm) == [] and store.relationship(vm).cycle == 7
    with pytest.raises(AttributeError):          # went on: the host has no driver
        run_cycle(host, vm, slot=s + 60)
