"""Watching: measure, dashboard, health thresholds."""

from __future__ import annotations

from ..domain.units import format_size
from .main import client_of
from .render import ago, duration, emit_json


def register(sub) -> None:
    p = sub.add_parser("measure", help="sizes, lag, durations, missed cycles, errors, bytes")
    p.add_argument("vm")
    p.add_argument("--hours", type=int, default=48,
                   help="the history line covers this many hours (default 48; cycles are "
                        "kept in full a day, per hour 90 days)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("dashboard", help="print the dashboard's address with a one-time login")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("health-thresholds", help="show or set when health turns warning or "
                                                 "critical")
    p.add_argument("--missed-pct", type=float, help="warning at this %% of cycles missed in 12 h")
    p.add_argument("--lag-factor", type=float, help="warning when lag > factor x frequency")
    p.add_argument("--failures", type=int, help="critical after this many failed cycles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_thresholds)


def cmd_measure(args) -> int:
    m = client_of(args).call("GET", f"/v1/relationships/{args.vm}/measure"
                                    f"?hours={int(getattr(args, 'hours', 48))}")
    if args.json:
        emit_json(m)
        return 0
    in_sync = m.get("mode") == "continuous" and m.get("sync_state") == "in_sync" and \
        m["state"] == "replicating"
    rows = [
        ("role / peer", f"{m['role']} / {m['peer']}"), ("state", m["state"]),
        ("health", m["health"] + "".join(f"\n{'':22}{r}" for r in m["reasons"])),
        ("mode", _mode(m)),
        ("last sync", ago(m["last_cycle_at"])),
        ("lag", "0 (in sync)" if in_sync else duration(m["lag_seconds"])),
        ("pending", "-" if m["pending_bytes"] is None else format_size(m["pending_bytes"])),
        ("cycles (12 h)", f"{m['cycles']} done, {m['errors']} failed (continuous: "
                          "cycles only to catch up)" if m.get("mode") == "continuous" and
         not m["expected_cycles"] else
         f"{m['cycles']} of {m['expected_cycles']} expected, "
         f"{m['missed_cycles']} missed ({m['missed_pct']} %), {m['errors']} failed"),
        ("cycle size", (f"avg {format_size(m['avg_cycle_bytes'])}, "
                        f"max {format_size(m['max_cycle_bytes'])}")),
        ("cycle duration", (f"avg {duration(m['avg_cycle_seconds'])}, "
                            f"max {duration(m['max_cycle_seconds'])}")),
        ("bytes (12 h)", (f"{format_size(m['bytes_raw'])} changed, "
                          f"{format_size(m['bytes_sent'])} sent")),
        ("throughput", "-" if not m["throughput_bps"] else
         f"{format_size(m['throughput_bps'])}/s"),
        ("last error", m["last_error"] or "-"),
    ]
    hist = m.get("history")
    if hist:
        rows.append((f"history ({hist['hours']} h)",
                     (f"{hist['cycles']} done, {hist['failures']} failed, {hist['late']} late, "
                     f"{format_size(hist['bytes_raw'])} changed, "
                     f"{format_size(hist['bytes_sent'])} sent, cycle duration avg "
                     f"{duration(hist['avg_cycle_seconds'])}, max "
                     f"{duration(hist['max_cycle_seconds'])}")))
    if m.get("tracking"):
        from ..domain.tracking import text_of  # (dataclasses: not for every command)
        rows.insert(4, ("tracking", f"\n{'':22}".join(text_of(t) for t in m["tracking"])))
    if m.get("activity"):
        from .render import progress_text
        rows.insert(2, ("running", progress_text(m["activity"])))
    print(f"{m['vm']}")
    for k, v in rows:
        print(f"  {k:20}{v}")
    return 0


def _mode(m: dict) -> str:
    """The replication mode as status's MODE column says it, in words."""
    if (m.get("mode") or "periodic") == "periodic":
        return f"periodic, every {m['frequency']}"
    sync = m.get("sync_state")
    words: dict[str | None, str] = {
        "in_sync": "in sync (the replica has every acknowledged write)",
        "catching_up": "catching up (cycles, then the mirror)",
        "degraded": "degraded (the mirror stopped; changes are tracked)",
        "idle": f"idle (the VM is off: cycles every {m['frequency']})"}
    text = f"continuous, {words.get(sync, sync or 'starting')}"
    if m.get("last_write_at"):
        text += f"; last write {ago(m['last_write_at'])}"
    return text


def cmd_dashboard(args) -> int:
    info = client_of(args).call("POST", "/v1/dashboard/token")
    if args.json:
        emit_json(info)
        return 0
    print("Open this address (valid once, for 10 minutes; the certificate is this host's own, "
          "pinned by its fingerprint: `vmreplica host`):")
    print(info["url"])
    return 0


def cmd_thresholds(args) -> int:
    body = {k: v for k, v in (("missed_warning_pct", args.missed_pct),
                              ("lag_warning_factor", args.lag_factor),
                              ("failures_critical", args.failures)) if v is not None}
    client = client_of(args)
    info = client.call("POST", "/v1/health-thresholds", body) if body else \
        client.call("GET", "/v1/health-thresholds")
    if args.json:
        emit_json(info)
        return 0
    print(f"warning: {info['missed_warning_pct']:g} % of cycles missed in 12 h, or lag over "
          f"{info['lag_warning_factor']:g} x the frequency; critical: "
          f"{info['failures_critical']} failed cycles in a row")
    return 0
