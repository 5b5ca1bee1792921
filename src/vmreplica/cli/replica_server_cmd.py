"""replica-server commands: enable (with authorization entries), disable, show."""

from __future__ import annotations

from .main import client_of
from .render import emit_json, table


def register(sub) -> None:
    p = sub.add_parser("replica-server", help="accept replication from other hosts")
    rsub = p.add_subparsers(dest="rs_command", metavar="ACTION")
    rsub.required = True
    e = rsub.add_parser("enable", help="enable, and allow primaries (patterns of host names)")
    e.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                   help="primary host name pattern: name, '*', '*.example.com' (repeatable)")
    e.add_argument("--storage", help="where replica disks of these primaries are stored")
    e.add_argument("--tag", default="", help="security tag the primaries must present")
    e.add_argument("--network-map", action="append", default=[], metavar="SRC=DST",
                   help="default for every VM from these primaries: NICs on their network "
                        "or bridge SRC come up on this host's DST at failover (repeatable; "
                        "a VM's own --network-map overrides it)")
    e.set_defaults(func=cmd_enable)
    d = rsub.add_parser("disable", help="stop accepting new relationships")
    d.set_defaults(func=cmd_disable)
    s = rsub.add_parser("show", help="settings and authorization entries")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)


def cmd_enable(args) -> int:
    info = client_of(args).call("POST", "/v1/replica-server", {
        "enabled": True, "allow": args.allow, "storage": args.storage, "tag": args.tag,
        "network_map": args.network_map or None})
    _print(info)
    return 0


def cmd_disable(args) -> int:
    _print(client_of(args).call("POST", "/v1/replica-server", {"enabled": False}))
    return 0


def cmd_show(args) -> int:
    info = client_of(args).call("GET", "/v1/replica-server")
    if args.json:
        emit_json(info)
    else:
        _print(info)
    return 0


def _print(info) -> None:
    print(f"replica server on {info['name']} ({info['listen']}): "
          f"{'enabled' if info['enabled'] else 'disabled'}")
    print(f"  default storage {info['storage']}")
    if info.get("network_map"):
        print("  default network map "
              + ", ".join(f"{s}={d}" for s, d in sorted(info["network_map"].items())))
    if info["authorizations"]:
        table([[a["pattern"], a["storage"], a["tag"] or "-"] for a in info["authorizations"]],
              ["ALLOWED PRIMARY", "STORAGE", "TAG"])
    else:
        print("  no primary is allowed yet: add one with --allow PATTERN")
