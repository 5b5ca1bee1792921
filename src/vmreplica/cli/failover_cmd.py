"""Recovery points and the failover family: points, failover (test, planned, unplanned,
cancel, complete), reverse."""

from __future__ import annotations

import time

from ..domain.units import format_size
from . import bulk
from .main import client_of
from .render import emit_json, size, table


def register(sub) -> None:
    p = sub.add_parser("points", help="list a VM's recovery points (on either host)")
    p.add_argument("vm")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("failover", help="test, planned or unplanned failover of a VM",
                       description="On the replica: `failover VM [--point ID]` starts the VM "
                       "here (planned if the primary ran --prepare, else unplanned: then "
                       "--complete or --cancel; refused while the primary answers and runs "
                       "the VM, unless --force); --test / --stop-test run a throw-away copy. "
                       "On the primary: --prepare [--shutdown] (and --cancel). Several VMs, "
                       "--all or --tag: a whole site at once.")
    bulk.add_targets(p)
    g = p.add_mutually_exclusive_group()
    for flag, text in (("--test", "start VM-test from a point, replication goes on"),
                       ("--stop-test", "stop and delete the test VM and its files"),
                       ("--prepare", "on the primary: VM off, final cycle, zero loss"),
                       ("--complete", "commit an unplanned failover"),
                       ("--cancel", "discard an unplanned failover (or undo --prepare)")):
        g.add_argument(flag, dest="action", action="store_const",
                       const=flag[2:], help=text)
    p.add_argument("--point", help="recovery point id (default: the latest state)")
    p.add_argument("--network", metavar="none|isolated|NAME",
                   help="test failover: the test VM's NICs on an isolated network (default "
                        "for an existing libvirt domain's replica), none, or on this host's "
                        "libvirt network or bridge NAME (default for other VMs: none)")
    p.add_argument("--re-ip", action="store_true",
                   help="test failover: set the failover IPs in the test VM too (by default "
                        "it keeps the primary's addresses)")
    p.add_argument("--shutdown", action="store_true",
                   help="with --prepare: shut the running VM down cleanly first")
    p.add_argument("--force", action="store_true",
                   help="unplanned failover even though the primary answers and runs the VM "
                        "(its writes since the point are lost at reverse)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bulk.each(cmd_failover), action="start")

    p = sub.add_parser("reverse", help="after a failover: this host becomes the primary, the "
                                       "old primary its replica (only differences move)")
    bulk.add_targets(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bulk.each(cmd_reverse))


def cmd_points(args) -> int:
    pts = client_of(args).call("GET", f"/v1/relationships/{args.vm}/points")["points"]
    if args.json:
        emit_json(pts)
        return 0
    if not pts:
        print(f"{args.vm} has no recovery points yet")
        return 0
    rows = []
    for p in pts:
        if p.get("error"):
            rows.append(["?", p["host"], "-", "-", p["error"]])
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["time"]))
        rows.append([p["id"], p["host"], when, p["kind"], size(p["size"])])
    table(rows, ["POINT", "HOST", "TIME", "KIND", "SIZE"])
    return 0


def cmd_failover(args) -> int:
    body = {"action": args.action, "point": args.point, "network": args.network,
            "shutdown": args.shutdown, "force": args.force, "re_ip": args.re_ip}
    from .render import watch
    client = client_of(args)
    label = {"test": "test failover", "prepare": "prepare"}.get(args.action, "failover")
    # On a terminal: the final cycle's progress (--prepare), or what it waits for (a
    # running cycle, the KVM probe before the first VM start on this machine).
    info = watch(client, f"{label} of {args.vm}", lambda: client.call(
        "POST", f"/v1/relationships/{args.vm}/failover", body), vm=args.vm, own=("delta",),
        show=not args.json)
    if args.json:
        emit_json(info)
        return 0
    a = args.action
    if a == "test":
        print(f"test failover: {info['test_vm']} started from point {info['point']} in "
              f"{info['seconds']:.2f} s (network: {info['network']}); replication goes on")
    elif a == "stop-test":
        print(f"test failover stopped: {info['stopped']} and its files deleted")
    elif a == "prepare":
        print(f"{info['vm']} prepared for planned failover: final cycle {info['final_cycle']} "
              f"acknowledged ({format_size(info['raw_bytes'])} shipped)")
    elif a == "start":
        kind = "planned failover" if info["planned"] else "unplanned failover"
        print(f"{kind}: {info['vm']} started here from point {info['point']} "
              f"(state {info['state']})")
        primary = info.get("primary") or {}
        if info.get("warning"):
            print(f"warning: {info['warning']}")
        elif primary and not primary.get("reachable"):
            print(f"the primary {primary['primary']} could not be reached: {primary['error']}")
    elif a in ("cancel", "complete"):
        print(f"{info['vm']}: {info['state']}")
    if info.get("re_ip"):
        print(f"re-IP: {info['re_ip']}")
    if info.get("next"):
        print(f"next: {info['next']}")
    return 0


def cmd_reverse(args) -> int:
    info = client_of(args).call("POST", f"/v1/relationships/{args.vm}/reverse")
    if args.json:
        emit_json(info)
        return 0
    moved, total = info["bytes_moved"], info["disk_bytes"]
    print(f"reverse replication of {info['vm']}: {info['primary']} is the primary, "
          f"{info['replica']} the replica (epoch {info['epoch']})")
    print(f"  moved {format_size(moved)} of {format_size(total)} "
          f"({100.0 * moved / max(total, 1):.2f} % of the disks) in {info['seconds']:.1f} s")
    return 0
