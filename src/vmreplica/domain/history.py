"""The cycle history as running aggregates: what health and `status` are judged on,
kept up to date as cycles start and end instead of recomputed from the rows every
pass, and the per-hour aggregates old cycles are rolled up into. Pure: the store feeds
it the cycles and the time.

``CycleWindow`` holds one VM's cycles of the last 12 h (health.WINDOW) with running
sums and maxima and the slots its good cycles kept; ``measure`` gives exactly what
``health.measure`` gives from the rows, in time that does not grow with the history
(sums and counts in O(1), maxima through monotonic queues, the kept slots counted by
bisection)."""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
from dataclasses import dataclass

from .health import WINDOW, CycleRecord, figures, judged_since
from .relationship import Relationship
from .schedule import covered_slots, judged_slots, phase, slot_index

HOUR = 3600
LATE_AFTER = 1.0    # a scheduled cycle that started this long after its slot was due is late


def hour_of(t: float) -> float:
    """The start of the hour (UTC) ``t`` falls in."""
    return float(math.floor(t / HOUR) * HOUR)


def is_late(c: CycleRecord) -> bool:
    return c.slot is not None and c.started_at - c.slot > LATE_AFTER


@dataclass(frozen=True, kw_only=True)
class HourAggregate:
    """The cycles of one VM that started in one hour: how many ended well, how many
    failed (or never ended), bytes, durations of the good ones, late scheduled ones."""
    vm: str
    hour: float
    cycles: int = 0
    failures: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    seconds_sum: float = 0.0
    seconds_max: float = 0.0
    bytes_max: int = 0
    late: int = 0

    def plus(self, other: HourAggregate) -> HourAggregate:
        return HourAggregate(
            vm=self.vm, hour=self.hour, cycles=self.cycles + other.cycles,
            failures=self.failures + other.failures,
            raw_bytes=self.raw_bytes + other.raw_bytes,
            wire_bytes=self.wire_bytes + other.wire_bytes,
            seconds_sum=self.seconds_sum + other.seconds_sum,
            seconds_max=max(self.seconds_max, other.seconds_max),
            bytes_max=max(self.bytes_max, other.bytes_max), late=self.late + other.late)

    def to_dict(self) -> dict:
        return {"hour": self.hour, "cycles": self.cycles, "failures": self.failures,
                "bytes_raw": self.raw_bytes, "bytes_sent": self.wire_bytes,
                "avg_cycle_seconds": round(self.seconds_sum / self.cycles, 3)
                if self.cycles else None,
                "max_cycle_seconds": round(self.seconds_max, 3) if self.cycles else None,
                "max_cycle_bytes": self.bytes_max, "late": self.late}


def aggregate(vm: str, cycles: list[CycleRecord]) -> list[HourAggregate]:
    """Per-hour aggregates of ``cycles`` (any order), oldest hour first. A cycle that
    never ended counts as a failure."""
    hours: dict[float, HourAggregate] = {}
    for c in cycles:
        h = hour_of(c.started_at)
        good = bool(c.ok) and c.finished_at is not None
        secs = (c.finished_at - c.started_at) if good and c.finished_at else 0.0
        one = HourAggregate(vm=vm, hour=h, cycles=int(good), failures=int(not good),
                            raw_bytes=int(c.raw_bytes or 0) if good else 0,
                            wire_bytes=int(c.wire_bytes or 0) if good else 0,
                            seconds_sum=secs, seconds_max=secs,
                            bytes_max=int(c.raw_bytes or 0) if good else 0,
                            late=int(is_late(c)))
        hours[h] = hours[h].plus(one) if h in hours else one
    return [hours[h] for h in sorted(hours)]


def total(vm: str, hours: list[HourAggregate], since: float) -> dict:
    """The figures of a run of hours (``history`` of `measure VM`)."""
    t = HourAggregate(vm=vm, hour=since)
    for h in hours:
        t = t.plus(h)
    out = t.to_dict()
    del out["hour"]
    return {"since": since, **out, "per_hour": [h.to_dict() for h in hours]}


class _MaxQueue:
    """The maximum of a sliding window: values pushed at the new end, expired in the
    same order from the old end (each value tagged with its cycle's row id)."""

    def __init__(self) -> None:
        self._q: collections.deque[tuple[int, float]] = collections.deque()

    def push(self, key: int, value: float) -> None:
        while self._q and self._q[-1][1] <= value:
            self._q.pop()
        self._q.append((key, value))

    def expire(self, key: int) -> None:
        if self._q and self._q[0][0] == key:
            self._q.popleft()

    def max(self, default: float) -> float:
        return self._q[0][1] if self._q else default


class CycleWindow:
    """One VM's cycles of the last ``WINDOW`` seconds and their running aggregates.
    ``add`` a cycle as it starts (or a finished one), ``finish`` it as it ends, and
    ``measure`` expires what fell out of the window first. Cycles are added in the
    order they started (one VM's cycles do not overlap), and read at times that do not
    go back (a clock stepped back finds what it expired gone until it catches up)."""

    def __init__(self, vm: str, frequency: int):
        self.vm = vm
        self.frequency = frequency
        self._phase = phase(vm, frequency)
        self._cycles: collections.deque[CycleRecord] = collections.deque()
        self._ok = self._failed = 0
        self._raw = self._wire = 0
        self._busy_us = 0                   # the good cycles' durations, microseconds
        self._max_bytes = _MaxQueue()
        self._max_secs = _MaxQueue()
        self._failures: collections.deque[CycleRecord] = collections.deque()
        self._newest_ok: CycleRecord | None = None
        self._kept: dict[int, int] = {}     # kept slot -> how many good cycles keep it
        self._kept_sorted: list[int] = []

    @classmethod
    def of(cls, vm: str, frequency: int, cycles: list[CycleRecord]) -> CycleWindow:
        """A window filled with ``cycles`` (newest first, as the store lists them)."""
        w = cls(vm, frequency)
        for c in reversed(cycles):
            w.add(c)
        return w

    def __len__(self) -> int:
        return len(self._cycles)

    def holds(self, row_id: int) -> bool:
        """Whether cycle ``row_id`` is one of this window's running or newest ones."""
        return any(c.id == row_id for c in itertools.islice(reversed(self._cycles), 4))

    # -- feeding -----------------------------------------------------------------------
    def add(self, c: CycleRecord) -> None:
        self._cycles.append(c)
        if c.ok is not None:
            self._count(c, +1)

    def finish(self, row_id: int, **outcome) -> None:
        """Cycle ``row_id`` ended: ``ok``, ``finished_at``, bytes, ``error``."""
        for i in range(len(self._cycles) - 1, -1, -1):
            c = self._cycles[i]
            if c.id == row_id:
                was = c.ok
                self._cycles[i] = c = dataclasses.replace(c, **outcome)
                if was is None and i == len(self._cycles) - 1:
                    self._count(c, +1)
                else:
                    # (an older cycle ending after a newer one began, or one ended
                    # twice: rare; counted again from the cycles)
                    self._rebuild()
                return

    def expire(self, now: float) -> None:
        """Drop the cycles that started before the window of ``now``."""
        start = now - WINDOW
        while self._cycles and self._cycles[0].started_at < start:
            c = self._cycles.popleft()
            if c.ok is not None:
                self._count(c, -1)

    def _rebuild(self) -> None:
        cycles = list(self._cycles)
        self.__init__(self.vm, self.frequency)  # type: ignore[misc]
        for c in cycles:
            self.add(c)

    def _count(self, c: CycleRecord, sign: int) -> None:
        """Count ``c`` in (+1, as it is added or ends) or out (-1, only as it expires
        from the old end: the queues give up their oldest entries)."""
        if c.ok:
            secs_us = round(((c.finished_at or c.started_at) - c.started_at) * 1e6)
            self._ok += sign
            self._raw += sign * int(c.raw_bytes or 0)
            self._wire += sign * int(c.wire_bytes or 0)
            self._busy_us += sign * secs_us
            if sign > 0:
                self._max_bytes.push(c.id, int(c.raw_bytes or 0))
                self._max_secs.push(c.id, (c.finished_at or c.started_at) - c.started_at)
                self._newest_ok = c
            else:
                self._max_bytes.expire(c.id)
                self._max_secs.expire(c.id)
                if self._newest_ok is not None and self._newest_ok.id == c.id:
                    self._newest_ok = None
            for k in self._kept_by(c):
                self._keep(k, sign)
        elif c.ok == 0:
            self._failed += sign
            if sign > 0:
                self._failures.append(c)
            elif self._failures and self._failures[0].id == c.id:
                self._failures.popleft()

    def _kept_by(self, c: CycleRecord) -> list[int]:
        kept = []
        if c.kind != "initial":
            kept.append(slot_index(self.vm, self.frequency, c.started_at))
        if c.slot is None and c.finished_at is not None:
            kept.extend(covered_slots(self.vm, self.frequency, c.kind, c.finished_at))
        return kept

    def _keep(self, k: int, sign: int) -> None:
        n = self._kept.get(k, 0) + sign
        if n > 0:
            if k not in self._kept:
                bisect.insort(self._kept_sorted, k)
            self._kept[k] = n
        else:
            self._kept.pop(k, None)
            i = bisect.bisect_left(self._kept_sorted, k)
            if i < len(self._kept_sorted) and self._kept_sorted[i] == k:
                del self._kept_sorted[i]

    def _kept_between(self, first: int, last: int) -> int:
        """How many kept slots are in [first, last]."""
        if last < first:
            return 0
        return bisect.bisect_right(self._kept_sorted, last) - \
            bisect.bisect_left(self._kept_sorted, first)

    # -- reading ----------------------------------------------------------------------
    def measure(self, rel: Relationship, now: float) -> dict:
        """What ``health.measure(rel, <the rows of the last 12 h>, now)`` returns."""
        self.expire(now)
        freq = rel.frequency
        if freq != self.frequency:
            # (a new frequency: the kept slots are counted on the new grid)
            cycles = list(self._cycles)
            self.__init__(self.vm, freq)  # type: ignore[misc]
            for c in cycles:
                self.add(c)
        slots = judged_slots(rel.vm, freq, judged_since(rel, now), now)
        expected = len(slots)
        if rel.mode == "continuous" and rel.sync_state != "idle":
            expected = 0
        kept = 0
        if expected:
            first, last = slots.start, slots.stop - 1
            kept = self._kept_between(first, last)
            if rel.unscheduled_until:
                # the judged slot due in the frequency before unscheduled_until (if
                # any, and not kept by a cycle) is covered (health.measure)
                k = math.ceil((rel.unscheduled_until - self._phase) / freq) - 1
                if first <= k <= last and k not in self._kept and \
                        rel.unscheduled_until - freq <= self._phase + k * freq:
                    kept += 1
        missed = max(0, expected - kept)
        newest = self._cycles[-1] if self._cycles else None
        failed = self._failures[-1] if self._failures else None
        last_secs = None
        if self._newest_ok is not None and self._newest_ok.finished_at:
            last_secs = self._newest_ok.finished_at - self._newest_ok.started_at
        return figures(
            rel, now, ok=self._ok, errors=self._failed, expected=expected, missed=missed,
            raw=self._raw, wire=self._wire,
            max_bytes=int(self._max_bytes.max(0)), busy=self._busy_us / 1e6,
            durations=self._ok, max_seconds=self._max_secs.max(0.0) if self._ok else None,
            last_seconds=last_secs,
            last_error=newest.error if newest is not None and newest.ok == 0 else None,
            last_failure=failed)
