"""Sizes and durations as operators type them (``8G``, ``512M``, ``30s``, ``5m``)."""

from __future__ import annotations

import re

from ..errors import UsageError

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"invalid size {text!r}", hint="use a number with K, M, G or T, e.g. 8G")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    size = int(value)
    if size <= 0:
        raise UsageError(f"invalid size {text!r}: must be larger than zero")
    if size % 512:
        raise UsageError(f"invalid size {text!r}: must be a multiple of 512 bytes")
    return size


def format_size(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text))
    if not m:
        raise UsageError(f"invalid duration {text!r}", hint="use e.g. 30s, 5m, 1h")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
