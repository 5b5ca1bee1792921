"""Replication frequencies (30 s, 5 min, 15 min, as in Hyper-V Replica) and when a cycle is due."""

from __future__ import annotations

from ..errors import UsageError
from .units import parse_duration

FREQUENCIES = {"30s": 30, "5m": 300, "15m": 900}


def parse_frequency(text: str) -> int:
    """Return the frequency in seconds. Only the three supported values are accepted."""
    try:
        seconds = parse_duration(text)
    except UsageError:
        seconds = None
    if seconds not in FREQUENCIES.values():
        raise UsageError(f"unsupported frequency {text!r}", hint="choose 30s, 5m or 15m")
    return seconds


def format_frequency(seconds: int) -> str:
    for name, value in FREQUENCIES.items():
        if value == seconds:
            return name
    return f"{seconds}s"


def next_due(last_attempt: float | None, frequency: int) -> float:
    """The time the next cycle is due; a relationship never attempted is due at once."""
    return 0.0 if last_attempt is None else last_attempt + frequency


def missed_cycles(last_success: float | None, now: float, frequency: int) -> int:
    """Cycles that should have completed since the last success but did not."""
    if last_success is None:
        return 0
    return max(0, int((now - last_success) // frequency) - 1)
