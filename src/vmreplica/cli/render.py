"""Rendering for humans (aligned tables, sizes, ages) and for scripts (--json)."""

from __future__ import annotations

import json
import sys
import time

from ..domain.units import format_duration, format_size


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


COLOURS = {"normal": "32", "warning": "33", "critical": "31", "running": "32",
           "failed_over": "36", "fenced": "31"}


def _colour(text: str) -> str:
    code = COLOURS.get(text)
    return f"\033[{code}m{text}\033[0m" if code else text


def table(rows: list[list], headers: list[str]) -> None:
    """Aligned columns; on a terminal, health and state words in colour."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    tty = sys.stdout.isatty()
    for n, r in enumerate(cells):
        line = "  ".join((_colour(c) + " " * (w - len(c))) if tty and n else c.ljust(w)
                         for c, w in zip(r, widths))
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def progress(label: str, done: int, total: int) -> None:
    """One line of progress on stderr (redrawn on a terminal)."""
    pct = 100.0 * done / total if total else 100.0
    bar = "#" * int(pct / 4)
    text = (f"{label}: [{bar:<25}] {pct:5.1f} % ({format_size(done)} of "
            f"{format_size(total)})")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text)
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def with_progress(client, vm: str, label: str, call):
    """Run ``call()`` (a long request) while polling the VM's progress for a bar."""
    import threading
    box: dict = {}

    def run():
        try:
            box["out"] = call()
        except BaseException as e:  # noqa: BLE001 — re-raised below
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    shown = False
    while t.is_alive():
        t.join(1.0)
        if not t.is_alive():
            break
        try:
            st = client.call("GET", f"/v1/status?vm={vm}")["relationships"][0]
        except Exception:  # noqa: BLE001 — progress is best effort
            continue
        p = st.get("progress")
        if p and p.get("total"):
            progress(label, p["done"], p["total"])
            shown = True
    if shown and sys.stderr.isatty():
        sys.stderr.write("\n")
    if "err" in box:
        raise box["err"]
    return box["out"]


def size(n) -> str:
    return "-" if n is None else format_size(n)


def ago(ts) -> str:
    if not ts:
        return "never"
    return format_duration(time.time() - ts) + " ago"


def duration(s) -> str:
    return format_duration(s)
