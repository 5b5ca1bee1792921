"""events: what happened on this host (failover steps, cycles that failed, fencing...)."""

from __future__ import annotations

import time

from .main import client_of
from .render import emit_json, table


def register(sub) -> None:
    p = sub.add_parser("events", help="events of this host, oldest first")
    p.add_argument("vm", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)


def cmd_events(args) -> int:
    q = f"?vm={args.vm}" if args.vm else ""
    events = client_of(args).call("GET", f"/v1/events{q}")["events"]
    if args.json:
        emit_json(events)
        return 0
    table([[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"])), e["vm"] or "-",
            e["kind"], e["message"]] for e in events], ["TIME", "VM", "KIND", "MESSAGE"])
    return 0
