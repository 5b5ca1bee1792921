"""Replication health (normal / warning / critical), always with the reasons behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import missed_cycles
from .states import State


@dataclass
class Health:
    level: str = "normal"
    reasons: list[str] = field(default_factory=list)

    def raise_to(self, level: str, reason: str) -> None:
        order = ["normal", "warning", "critical"]
        if order.index(level) > order.index(self.level):
            self.level = level
        self.reasons.append(reason)


def assess(rel: dict, now: float) -> Health:
    """Health of one relationship seen from its primary side (or replica side)."""
    h = Health()
    state = State(rel["state"])
    freq = int(rel.get("frequency") or 300)
    if rel.get("fenced"):
        h.raise_to("critical", f"fenced: {rel['fenced']}")
    elif state in (State.ERROR,):
        h.raise_to("critical", f"replication failing: {rel.get('last_error') or 'error'}")
    elif state == State.SUSPENDED:
        h.raise_to("critical", "replication is suspended")
    elif state == State.RESYNC_REQUIRED:
        h.raise_to("warning", f"resynchronization required: {rel.get('last_error') or ''}".rstrip(": "))
    elif state in (State.READY_FOR_INITIAL, State.WAITING_FOR_INITIAL):
        h.raise_to("warning", "initial replication has not run")
    if rel.get("role") == "primary" and state == State.REPLICATING:
        if rel.get("consecutive_failures", 0) > 0:
            level = "critical" if rel["consecutive_failures"] >= 3 else "warning"
            h.raise_to(level, f"last {rel['consecutive_failures']} cycle(s) failed: "
                              f"{rel.get('last_error') or 'unknown error'}")
        last = rel.get("last_success_at")
        if last is not None:
            lag = now - last
            if lag > 2 * freq:
                h.raise_to("warning", f"lag {lag:.0f}s is over twice the frequency ({freq}s)")
            missed = missed_cycles(last, now, freq)
            if missed:
                h.raise_to("warning", f"{missed} cycle(s) missed")
    return h
