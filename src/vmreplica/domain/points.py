"""Recovery points: when one is due, which kind it is, what retention merges. Pure.

A VM's replicated disks are chains of layers ``L0 ← L1 ← … ← Lm``; ``Lm`` (the head)
takes the cycles; every lower layer is the top of exactly one recovery point, in order.
Freezing the head makes it a point and puts a new head on top; retention merges the
oldest point's successor down into the base, so the remaining points keep their bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UsageError
from .units import parse_duration

MAX_HISTORY = 24
CRASH, APP, LATEST = "crash", "app", "latest"


@dataclass(frozen=True, kw_only=True)
class Point:
    """A recovery point as the host that holds the chains records it (a row of the
    store's ``recovery_points``): layer ``layer`` of every disk's chain is its top."""
    vm: str
    id: int
    point_time: float                    # the primary's freeze time of its cycle
    kind: str                            # CRASH | APP
    layer: int
    created_at: float = 0.0              # set by the store


def validate_history(n: int) -> int:
    if not 0 <= int(n) <= MAX_HISTORY:
        raise UsageError(f"recovery history must be 0 to {MAX_HISTORY}, not {n}")
    return int(n)


def parse_interval(text: str | int) -> int:
    seconds = parse_duration(str(text))
    if seconds <= 0:
        raise UsageError(f"invalid point interval {text!r}", hint="e.g. 1h, 15m, 30s")
    return seconds


def point_due(last_point_at: float | None, interval: int, now: float, history: int) -> bool:
    """A cycle carries a new point when the interval has passed since the last one."""
    if history <= 0:
        return False
    return last_point_at is None or now - last_point_at >= interval


def kind_for(points_made: int, app_every: int) -> str:
    """The kind the next point should be: every ``app_every``-th one app-consistent."""
    if app_every and (points_made + 1) % app_every == 0:
        return APP
    return CRASH


def merges_needed(point_count: int, history: int, pinned: bool = False) -> int:
    """How many oldest points retention merges away now (none while one is in use)."""
    if pinned:
        return 0
    return max(0, point_count - history)


def after_merge(points: list[Point]) -> list[Point]:
    """The point list once the oldest point is merged away: every other point's top
    layer moves down by one (layer 1 was committed into layer 0 and removed)."""
    return [dataclasses.replace(p, layer=p.layer - 1)
            for p in sorted(points, key=lambda p: p.id)[1:]]
