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
                         for c, w in zip(r, widths, strict=False))
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def eta(seconds: float) -> str:
    """Time left, in whole seconds or minutes and seconds (``7 s``, ``2 min 05 s``)."""
    s = max(0, round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def progress_text(op: dict) -> str:
    """A running operation in one line: its phase, and while it moves data: a bar,
    percentage, bytes done of total, rate and time left (what `status`, `measure` and
    the CLI's progress lines show)."""
    if "done" not in op:
        return f"{op['label']}: {op.get('phase') or 'starting'} ({format_duration(op['seconds'])})"
    done, total = op["done"], op["total"]
    pct = op.get("percent", 100.0)
    bar = "#" * int(pct / 4)
    rate = op.get("rate_bps")
    extra = f", {format_size(rate)}/s" if rate else ""
    if op.get("eta_seconds") is not None and done < total:
        extra += f", ETA {eta(op['eta_seconds'])}"
    tail = f"; {op['phase']}" if done >= total and op.get("phase") else ""
    return (f"{op['label']}: [{bar:<25}] {pct:5.1f} % ({format_size(done)} of "
            f"{format_size(total)}{extra}){tail}")


def watch_line(label: str, op: dict, own: tuple[str, ...], vm: str | None) -> str:
    """What a command waiting for its answer says about operation ``op``: its own
    operation's progress (``own``: the kinds it runs), or what it waits for."""
    if op.get("vm") is None:                       # host-wide: the KVM probe
        left = ""
        if op.get("expected_seconds"):
            left = f", at most ~{eta(op['expected_seconds'] - op['seconds'])} left"
        return f"{op['label']}… ({eta(op['seconds'])}{left})"
    if op.get("kind") in own:
        return f"{label}: {progress_text(op)}"
    state = f"{op['percent']:.1f} %" if "percent" in op else (op.get("phase") or "running")
    if "percent" in op and op["done"] >= op["total"] and op.get("phase"):
        state += f"; {op['phase']}"
    return (f"{label}: waiting for the running {op['label']} of {op['vm']} to end ({state}, "
            f"running for {format_duration(op['seconds'])})…")


def watch(client, label: str, call, vm: str | None = None, own: tuple[str, ...] = (),
          interval: float = 0.25, show: bool = True):
    """Run ``call()`` (one long request to the daemon); meanwhile, on a terminal, show
    on stderr what the daemon is doing for it, redrawn in place: the progress of the
    operation it runs (kinds ``own``, on ``vm``), or what it waits for (another
    operation on ``vm``, the KVM probe). Not on a terminal, or not ``show`` (--json):
    just ``call()``, no output."""
    if not show or not sys.stderr.isatty():
        return call()
    import threading
    box: dict = {}

    def run():
        try:
            box["out"] = call()
        except BaseException as e:  # noqa: BLE001 — re-raised below
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    path = "/v1/activity" + (f"?vm={vm}" if vm else "")
    shown = ""
    t.join(interval)
    while t.is_alive():
        try:
            ops = client.call("GET", path).get("operations") or []
        except Exception:  # noqa: BLE001 — progress is best effort
            ops = []
        # The KVM probe first (nothing starts before it ends), then the VM's operation.
        ops.sort(key=lambda o: o.get("vm") is not None)
        text = watch_line(label, ops[0], own, vm) if ops else ""
        if text and text != shown:
            sys.stderr.write("\r" + text + "\033[K")
            sys.stderr.flush()
            shown = text
        t.join(interval)
    if shown:
        sys.stderr.write("\n")
        sys.stderr.flush()
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
