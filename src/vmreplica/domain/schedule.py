"""Replication frequencies (30 s, 5 min, 15 min, as in Hyper-V Replica) and when a cycle is due."""

from __future__ import annotations

import hashlib
import math

from ..errors import UsageError
from .units import parse_duration

FREQUENCIES = {"30s": 30, "5m": 300, "15m": 900}


def parse_frequency(text: str) -> int:
    """Return the frequency in seconds. Only the three supported values are accepted."""
    try:
        seconds = parse_duration(text)
    except UsageError:
        seconds = None
    if seconds is None or seconds not in FREQUENCIES.values():
        raise UsageError(f"unsupported frequency {text!r}", hint="choose 30s, 5m or 15m")
    return seconds


def format_frequency(seconds: int) -> str:
    for name, value in FREQUENCIES.items():
        if value == seconds:
            return name
    return f"{seconds}s"


def next_due(last_attempt: float | None, frequency: int) -> float:
    """The time the next periodic check is due (a seed poll, a resync retry, a peer
    check): ``frequency`` after the last one; never done: at once. Cycles run on slots."""
    return 0.0 if last_attempt is None else last_attempt + frequency


# -- cycle slots ------------------------------------------------------------------------
# Cycles are anchored to the clock: the slots of a relationship are phase(vm) + k ×
# frequency (k any integer, times in seconds since the epoch), so cycle k is due at a
# fixed time, however long the cycles before it took. The phase, a stable offset within
# the period derived from the VM's name, spreads VMs with the same frequency across it.
# Its replication is judged from the first slot at or after it started, was resumed or
# had its frequency changed (``schedule_since``).

def phase(vm: str, frequency: int) -> float:
    """The VM's stable offset within its period, in [0, frequency), to the millisecond:
    the same on every host and every run (a hash of the name, not Python's ``hash``)."""
    digest = hashlib.blake2b(vm.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % (int(frequency) * 1000)) / 1000.0


def slot_index(vm: str, frequency: int, t: float) -> int:
    """The number k of the slot that time ``t`` falls in: phase + k × frequency ≤ t."""
    return math.floor((t - phase(vm, frequency)) / frequency)


def slot_time(vm: str, frequency: int, k: int) -> float:
    """When slot k is due."""
    return phase(vm, frequency) + k * frequency


def slot_at(vm: str, frequency: int, t: float) -> float:
    """The due time of the slot ``t`` falls in (the latest slot due at or before ``t``)."""
    return slot_time(vm, frequency, slot_index(vm, frequency, t))


# Kinds of cycle that start replication afresh: the first scheduled cycle after one
# comes a whole frequency after it ended (nothing to ship sooner; and a test or an
# operator that counts what it moved sees no scheduled cycle race it).
FRESH_KINDS = ("initial", "resync")


def unscheduled_cover(kind: str, ended: float, frequency: int) -> float:
    """A cycle not started by the scheduler (the initial copy, a resync, a manual `sync`,
    the final cycle of a planned failover) that ended at ``ended`` stands for the
    scheduled slots due before the time returned: they do not run, and health counts
    them kept. After an initial copy or a resync: one frequency after it ended. After
    any other: half a frequency — the slot it ended in is its own, and the next one
    too when that is due less than half a period after it ended (so a scheduled cycle
    never follows a manual one within half a period, and the gap between two cycles is
    at most 1.5 periods: the lag stays under its 2 × frequency bound)."""
    return ended + (frequency if kind in FRESH_KINDS else frequency / 2)


def due_slot(vm: str, frequency: int, now: float, *, last_slot: float | None,
             last_attempt: float | None, unscheduled_until: float | None = None
             ) -> float | None:
    """The slot a scheduled cycle started ``now`` runs for, or None when that slot has
    had its cycle. ``last_slot``: the slot the last scheduled cycle ran for;
    ``last_attempt``: when a cycle last ran, None to run one at once (never run, the
    daemon restarted, replication resumed); ``unscheduled_until``: slots due before it
    are covered by the last cycle run outside the schedule (``unscheduled_cover``). A
    cycle that overran its slot finds later slots passed: one cycle runs at once for the
    latest of them and the schedule goes on from the next one (no burst of catch-up
    cycles)."""
    slot = slot_at(vm, frequency, now)
    if last_attempt is None:
        return slot
    if unscheduled_until is not None and slot < unscheduled_until - 1e-3:
        return None
    ran = last_slot if last_slot is not None else slot_at(vm, frequency, last_attempt)
    if slot <= ran + 1e-3:
        return None
    return slot


def covered_slots(vm: str, frequency: int, kind: str, ended: float) -> range:
    """The slots an unscheduled cycle that ended at ``ended`` stands for: due from the
    slot it ended in up to ``unscheduled_cover``."""
    cover = unscheduled_cover(kind, ended, frequency)
    first = slot_index(vm, frequency, ended)
    last = math.ceil((cover - 1e-3 - phase(vm, frequency)) / frequency) - 1
    return range(first, max(first, last + 1))


def judged_slots(vm: str, frequency: int, since: float, now: float) -> range:
    """The slots health judges between ``since`` (replication began on this schedule)
    and ``now``: those due at or after ``since`` whose whole slot is over by ``now`` (a
    cycle had its full period to start in it)."""
    first = math.ceil((since - phase(vm, frequency)) / frequency)
    last = slot_index(vm, frequency, now) - 1
    return range(first, max(first, last + 1))


def missed_cycles(last_success: float | None, now: float, frequency: int) -> int:
    """Cycles that should have completed since the last success but did not."""
    if last_success is None:
        return 0
    return max(0, int((now - last_success) // frequency) - 1)


def parse_window(text: str | None) -> tuple[int, int] | None:
    """``HH:MM-HH:MM`` (may wrap midnight, e.g. 18:30-06:00) → minutes of day; None/"" → none."""
    if not text:
        return None
    import re
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", str(text))
    if not m:
        raise UsageError(f"invalid window {text!r}", hint="use HH:MM-HH:MM, e.g. 18:30-06:00")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise UsageError(f"invalid window {text!r}: hours 0-23, minutes 0-59")
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(window: tuple[int, int] | None, minute_of_day: int) -> bool:
    """Whether a minute of the day (0-1439) falls in the window; no window: always."""
    if window is None:
        return True
    start, end = window
    if start == end:
        return True
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


def parse_when(text: str, now: float) -> float:
    """When to run something: ``+90s``/``+5m``/``+2h`` from now, ``HH:MM`` (the next such
    local time), or an ISO date-time ``2026-11-25T02:00``."""
    import datetime
    import re
    import time as _time
    text = str(text).strip()
    m = re.fullmatch(r"\+(\d+)\s*([smhd]?)", text)
    if m:
        return now + parse_duration(m.group(1) + (m.group(2) or "s"))
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if m:
        h, mi = int(m.group(1)), int(m.group(2))
        if h > 23 or mi > 59:
            raise UsageError(f"invalid time {text!r}")
        t = _time.localtime(now)
        today = _time.mktime((t.tm_year, t.tm_mon, t.tm_mday, h, mi, 0, 0, 0, -1))
        return today if today > now else today + 86400
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"invalid time {text!r}",
                         hint="use +30m, HH:MM or 2026-11-25T02:00") from None
