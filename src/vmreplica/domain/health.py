"""Replication health (normal / warning / critical), always with the reasons behind it,
and the cycle statistics it is judged on (Measure-VMReplication). Pure: the caller
passes the relationship, its recent cycles and the time."""

from __future__ import annotations

from dataclasses import dataclass, field

from .relationship import Relationship
from .schedule import covered_slots, judged_slots, parse_window, slot_index, slot_time
from .states import State

WINDOW = 12 * 3600

DEFAULT_THRESHOLDS = {
    "missed_warning_pct": 20.0,   # cycles missed in the last 12 h
    "lag_warning_factor": 2.0,    # lag over this many times the frequency
    "failures_critical": 2,       # consecutive failed cycles
}

LEVELS = ("normal", "warning", "critical")


@dataclass(frozen=True, kw_only=True, slots=True)
class CycleRecord:
    """One cycle in the history (a row of the store's ``cycles``): started, then
    finished with its outcome; ``ok`` is None while it runs (1 done, 0 failed)."""
    id: int
    vm: str
    cycle: int
    kind: str                            # initial | delta | resync | ...
    started_at: float
    finished_at: float | None = None
    ok: int | None = None
    raw_bytes: int = 0
    wire_bytes: int = 0
    extents: int = 0
    error: str | None = None
    slot: float | None = None            # scheduled: the due time of its slot; else None


@dataclass
class Health:
    level: str = "normal"
    reasons: list[str] = field(default_factory=list)

    def raise_to(self, level: str, reason: str) -> None:
        if LEVELS.index(level) > LEVELS.index(self.level):
            self.level = level
        self.reasons.append(reason)


def judged_since(rel: Relationship, now: float) -> float:
    """Since when the slots of ``rel`` are judged: the last 12 h, from when replication
    could run on this schedule (it began, was resumed, or its frequency or mode
    changed)."""
    return max(now - WINDOW, float(rel.replicating_since or rel.created_at or now),
               float(rel.schedule_since or 0.0))


def measure(rel: Relationship, cycles: list[CycleRecord], now: float) -> dict:
    """Statistics of the last 12 hours of cycles (newest first, as the store lists them).
    (The daemon keeps them as running aggregates instead: domain.history.CycleWindow,
    which gives the same figures without going through the rows.)"""
    recent = [c for c in cycles if c.started_at >= now - WINDOW]
    ok = [c for c in recent if c.ok]
    failed = [c for c in recent if c.ok == 0]
    sizes = [int(c.raw_bytes or 0) for c in ok]
    durations = [c.finished_at - c.started_at for c in ok if c.finished_at]
    freq = rel.frequency
    # Judged: the slots (domain.schedule) due since replication could run on this
    # schedule, and over by now; a slot is kept when a good cycle started in it, or the
    # scheduler skipped it for an unscheduled cycle (domain.schedule.unscheduled_cover).
    slots = judged_slots(rel.vm, freq, judged_since(rel, now), now)
    expected = len(slots)
    if rel.mode == "continuous" and rel.sync_state != "idle":
        expected = 0      # no schedule: cycles only catch up, then the mirror carries writes
    kept = kept_slots(rel.vm, freq, ok)
    if rel.unscheduled_until:
        # (an initial copy imported from media has no cycle here: the slot due in the
        # frequency before unscheduled_until is covered, as the scheduler skips it)
        kept.update(k for k in slots if rel.unscheduled_until - freq <=
                    slot_time(rel.vm, freq, k) < rel.unscheduled_until)
    missed = max(0, expected - sum(1 for k in kept if k in slots))
    return figures(rel, now, ok=len(ok), errors=len(failed), expected=expected,
                   missed=missed, raw=sum(sizes),
                   wire=sum(int(c.wire_bytes or 0) for c in ok),
                   max_bytes=max(sizes, default=0), busy=sum(durations),
                   durations=len(durations),
                   max_seconds=max(durations) if durations else None,
                   last_seconds=durations[0] if durations else None,
                   last_error=recent[0].error if recent and recent[0].ok == 0 else None,
                   last_failure=failed[0] if failed else None)


def figures(rel: Relationship, now: float, *, ok: int, errors: int, expected: int,
            missed: int, raw: int, wire: int, max_bytes: int, busy: float, durations: int,
            max_seconds: float | None, last_seconds: float | None, last_error: str | None,
            last_failure: CycleRecord | None) -> dict:
    """The figures of `measure` (and status, health) from the counts of the window."""
    last = rel.last_success_at if rel.role == "primary" else rel.last_freeze_at
    return {
        "cycles": ok, "errors": errors, "expected_cycles": expected,
        "missed_cycles": missed,
        "missed_pct": round(100.0 * missed / expected, 1) if expected else 0.0,
        "avg_cycle_bytes": int(raw / ok) if ok else 0,
        "max_cycle_bytes": max_bytes,
        "avg_cycle_seconds": round(busy / durations, 3) if durations else None,
        "max_cycle_seconds": round(max_seconds, 3) if max_seconds is not None else None,
        "last_cycle_seconds": round(last_seconds, 3) if last_seconds is not None else None,
        "bytes_raw": raw, "bytes_sent": wire,
        "throughput_bps": int(raw / busy) if busy else None,
        "last_cycle_at": last, "lag_seconds": (now - last) if last else None,
        # The last cycle's error: a good cycle after it clears it (the failures stay
        # counted in "errors", the newest one in "last_failure").
        "last_error": last_error,
        "last_failure": {"at": last_failure.started_at, "error": last_failure.error}
        if last_failure is not None else None,
    }


def kept_slots(vm: str, frequency: int, good: list[CycleRecord]) -> set[int]:
    """The slots the good cycles kept: the slot a cycle (not an initial copy) started
    in; and an unscheduled cycle (no ``slot``: initial, resync, manual) also stands for
    the slots the scheduler skipped after it (domain.schedule.covered_slots)."""
    kept: set[int] = set()
    for c in good:
        if c.kind != "initial":
            kept.add(slot_index(vm, frequency, c.started_at))
        if c.slot is None and c.finished_at is not None:
            kept.update(covered_slots(vm, frequency, c.kind, c.finished_at))
    return kept


def assess(rel: Relationship, now: float, stats: dict | None = None,
           thresholds: dict | None = None) -> Health:
    """Health of one relationship, seen from this side, with the reasons."""
    t = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))
    h = Health()
    state = State(rel.state)
    freq = rel.frequency
    failures = rel.consecutive_failures
    pending = rel.apply_pending
    if pending:
        # Replica side: a staged cycle not applied whole (replica.unapplied).
        h.raise_to("critical", f"{pending.get('error') or 'a staged cycle is not applied'}; "
                               "nothing reads the replica until it is applied")
    if rel.fenced:
        h.raise_to("critical", f"fenced: {rel.fenced}")
    elif state == State.ERROR:
        h.raise_to("critical", f"replication failing: {rel.last_error or 'error'}")
    elif state == State.SUSPENDED:
        h.raise_to("warning", "replication is suspended by the operator: changes are "
                              "tracked, the replica falls behind until `resume`")
    elif state == State.RESYNC_REQUIRED:
        reason = rel.resync_reason or rel.last_error or "tracking was broken"
        window = parse_window(rel.resync_window)
        if window is not None and rel.resync_window_missed:
            h.raise_to("critical", f"resynchronization required and its window "
                                   f"{rel.resync_window} passed without it: {reason}")
        else:
            h.raise_to("warning", f"resynchronization required: {reason}")
    elif state == State.RESYNCHRONIZING:
        h.raise_to("warning", "resynchronizing")
    elif state in (State.READY_FOR_INITIAL, State.WAITING_FOR_INITIAL, State.INITIAL_IN_PROGRESS):
        h.raise_to("warning", "initial replication has not completed")
    if rel.reip and rel.reip.get("state") == "failed":
        # (a failed re-IP is a warning on the VM that failed over, never a failed failover)
        h.raise_to("warning", f"re-IP of {rel.reip.get('vm')} failed: "
                              f"{rel.reip.get('message')}")
    if state == State.REPLICATING and \
            rel.mode == "continuous" and rel.sync_state in ("degraded", "catching_up"):
        h.raise_to("warning", f"continuous mode {rel.sync_state}"
                              + (f": {rel.sync_reason}" if rel.sync_reason else ""))
    if rel.role == "primary" and state == State.REPLICATING:
        if failures and rel.last_error_code == "storage_full":
            h.raise_to("critical", f"the replica's storage is full: "
                                   f"{rel.last_error or 'no space left'}")
        elif failures:
            level = "critical" if failures >= int(t["failures_critical"]) else "warning"
            h.raise_to(level, f"last {failures} cycle(s) failed: "
                              f"{rel.last_error or 'unknown error'}")
        last = rel.last_success_at
        if rel.mode == "continuous" and rel.sync_state == "in_sync":
            last = None       # the mirror has every write: no lag
        bound = float(t["lag_warning_factor"]) * freq
        if last is not None and rel.unscheduled_until and rel.unscheduled_until > last:
            # After a cycle run outside the schedule the next one is held back until
            # unscheduled_until (domain.schedule.unscheduled_cover): the bound counts
            # from there, not from that cycle's freeze (a new VM's initial copy).
            bound += rel.unscheduled_until - last
        if last is not None and now - last > bound:
            h.raise_to("warning", f"lag {now - last:.0f} s is over "
                                  f"{t['lag_warning_factor']:g} times the frequency ({freq} s)")
        if stats and stats.get("expected_cycles", 0) >= 5 and \
                stats["missed_pct"] >= float(t["missed_warning_pct"]):
            h.raise_to("warning", f"{stats['missed_cycles']} of {stats['expected_cycles']} "
                                  f"cycles missed in the last 12 h ({stats['missed_pct']:g} %)")
    if rel.role == "replica" and state == State.REPLICATING:
        history = rel.history
        have = rel.points_count
        interval = rel.point_interval
        since = rel.replicating_since
        if since is None:
            since = rel.created_at or None
        if have is not None and history and have < history and since is not None and \
                now - since > (history + 1) * interval:
            h.raise_to("warning", f"{have} recovery point(s), {history} asked for")
    return h
