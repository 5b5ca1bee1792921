"""Rendering for humans (aligned tables, sizes, ages) and for scripts (--json)."""

from __future__ import annotations

import json
import sys
import time

from ..domain.units import format_duration, format_size


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def table(rows: list[list], headers: list[str]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def size(n) -> str:
    return "-" if n is None else format_size(n)


def ago(ts) -> str:
    if not ts:
        return "never"
    return format_duration(time.time() - ts) + " ago"


def duration(s) -> str:
    return format_duration(s)
