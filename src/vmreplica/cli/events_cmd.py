"""events: what happened on this host (failover steps, cycles that failed, fencing...)."""

from __future__ import annotations

import time

from .main import client_of
from .render import emit_json, table


def register(sub) -> None:
    p = sub.add_parser("events", help="events of this host, oldest first")
    p.add_argument("vm", nargs="?")
    p.add_argument("--since", metavar="T", help="only newer events: 10m, 2h, 1d ago, or an ISO "
                                                "date-time")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="JSON (one object per line with --follow)")
    p.set_defaults(func=cmd_events)


def _since(text: str | None) -> float:
    if not text:
        return 0.0
    import datetime
    import re

    from ..domain.units import parse_duration
    from ..errors import UsageError
    if re.fullmatch(r"\d+[smhd]?", text.strip()):
        return time.time() - parse_duration(text)
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"invalid --since {text!r}", hint="use 10m, 2h, 1d or 2026-11-24T08:00") \
            from None


def _line(e: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
    return f"{when}  {e['vm'] or '-':12}  {e['kind']:10}  {e['message']}"


def cmd_events(args) -> int:
    from urllib.parse import urlencode
    q = {"since": _since(args.since)}
    if args.vm:
        q["vm"] = args.vm
    if args.follow:
        import json
        import sys
        q["follow"] = 1
        try:
            for e in client_of(args).stream(f"/v1/events?{urlencode(q)}"):
                print(json.dumps(e) if args.json else _line(e), flush=True)
        except KeyboardInterrupt:
            pass
        sys.stdout.flush()
        return 0
    events = client_of(args).call("GET", f"/v1/events?{urlencode(q)}")["events"]
    if args.json:
        emit_json(events)
        return 0
    table([[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"])), e["vm"] or "-",
            e["kind"], e["message"]] for e in events], ["TIME", "VM", "KIND", "MESSAGE"])
    return 0
