"""Trust commands: token (on the replica), pair (on the primary), list, remove."""

from __future__ import annotations

import time

from .main import client_of
from .render import emit_json, table


def register(sub) -> None:
    p = sub.add_parser("trust", help="pair hosts (pinned certificates, no CA)")
    tsub = p.add_subparsers(dest="trust_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser("token", help="print a one-time pairing token (15 minutes, single use)")
    t.set_defaults(func=cmd_token)
    t = tsub.add_parser("pair", help="pair with the host that printed TOKEN")
    t.add_argument("address", metavar="HOST:PORT")
    t.add_argument("token")
    t.set_defaults(func=cmd_pair)
    t = tsub.add_parser("list", help="list paired hosts")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_list)
    t = tsub.add_parser("remove", help="forget a paired host")
    t.add_argument("name")
    t.set_defaults(func=cmd_remove)


def cmd_token(args) -> int:
    info = client_of(args).call("POST", "/v1/trust/token")
    expires = time.strftime("%H:%M:%S", time.localtime(info["expires_at"]))
    print(f"On the primary, run (valid until {expires}, once):")
    print(f"  vmreplica trust pair {info['address']} <token below>")
    print(info["token"])
    return 0


def cmd_pair(args) -> int:
    info = client_of(args).call("POST", "/v1/trust/pair", {"address": args.address,
                                                           "token": args.token})
    print(f"paired with {info['peer']} at {info['address']}")
    print(f"  pinned certificate {info['fingerprint']}")
    return 0


def cmd_list(args) -> int:
    peers = client_of(args).call("GET", "/v1/trust/peers")["peers"]
    if args.json:
        emit_json(peers)
        return 0
    table([[p["name"], p["address"] or "-", p["fingerprint"][:30] + "…"] for p in peers],
          ["PEER", "ADDRESS", "FINGERPRINT"])
    return 0


def cmd_remove(args) -> int:
    client_of(args).call("DELETE", f"/v1/trust/peers/{args.name}")
    print(f"unpaired {args.name}")
    return 0
