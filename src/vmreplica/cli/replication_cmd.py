"""Replication commands: enable, initial, sync, status, suspend, resume, remove, test-connection."""

from __future__ import annotations

import argparse

from ..domain.units import format_size
from . import bulk
from .main import client_of
from .render import ago, duration, emit_json, progress_text, table, watch


def register(sub) -> None:
    p = sub.add_parser("enable", help="replicate VMs to a replica host")
    if isinstance(p, argparse.ArgumentParser):    # (not the stand-in of another command)
        _enable_options(p)

    p = sub.add_parser("dr", help="disaster-recovery links that follow the VM")
    dsub = p.add_subparsers(dest="dr_command", metavar="ACTION")
    dsub.required = True
    d = dsub.add_parser("adopt", help="on the host that runs the VM now: take its DR link "
                                      "over (the DR host refuses the old one from then on) "
                                      "and resynchronize only the differences")
    d.add_argument("vm", metavar="VM")
    d.add_argument("--replica", metavar="HOST:PORT",
                   help="the DR host, when this host has never held the link and its "
                        "partner did not name it")
    d.add_argument("--no-resync", action="store_true",
                   help="leave the resynchronization to the scheduler")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_dr_adopt)

    p = sub.add_parser("set", help="change replication settings of one or more VMs "
                                   "(no re-seeding)")
    bulk.add_targets(p)
    p.add_argument("--frequency", choices=["30s", "5m", "15m"])
    p.add_argument("--recovery-history", type=int, metavar="N", dest="history")
    p.add_argument("--point-interval", metavar="DURATION")
    p.add_argument("--app-consistent-every", type=int, metavar="N", dest="app_every")
    p.add_argument("--compression", choices=["zstd", "none"])
    p.add_argument("--resync-window", metavar="HH:MM-HH:MM|none")
    p.add_argument("--mode", choices=["periodic", "continuous"])
    p.add_argument("--max-stall", type=float, metavar="SECONDS")
    p.add_argument("--exclude-disk", action="append", default=[], metavar="NAME",
                   help="stop replicating this disk (repeatable)")
    p.add_argument("--include-disk", action="append", default=[], metavar="NAME",
                   help="start replicating this disk too (a resync seeds it)")
    p.add_argument("--failover-ip", action="append", dest="failover_ips",
                   metavar="NIC=ADDR/PREFIX[,gw=GW][,dns=A+B]|none",
                   help="the VM's failover addresses, replacing the ones set (repeatable, "
                        "one per NIC by MAC or index); none: no re-IP")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bulk.each(cmd_set))

    p = sub.add_parser("initial", help="seed the replica: the initial copy (allocated data "
                                       "only), an export for removable media, or a copy the "
                                       "replica already holds")
    bulk.add_targets(p, done="initial")
    p.add_argument("--method", choices=["network", "export", "existing"], default="network")
    p.add_argument("--path", metavar="DIR", help="export: folder to write the seed to (on "
                   "this host); existing: folder of the VM copy on the replica host")
    p.add_argument("--import", dest="import_dir", metavar="DIR",
                   help="on the replica: import a seed exported by the primary")
    p.add_argument("--at", metavar="TIME", help="run later: +30m, HH:MM or an ISO date-time")
    p.add_argument("--verify", action="store_true",
                   help="then compare block digests of the replica with the source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bulk.each(cmd_initial))

    p = sub.add_parser("sync", help="run one cycle now; exit 0 once the replica acked it")
    bulk.add_targets(p)
    p.add_argument("--verify", action="store_true",
                   help="then compare block digests of the replica's head with the frozen "
                        "point (reads both disks whole)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bulk.each(cmd_sync))

    p = sub.add_parser("status", help="state, health, last cycle and lag of relationships")
    p.add_argument("vm", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    for verb, text in (("suspend", "pause replication (changes stay tracked)"),
                       ("resume", "resume replication")):
        p = sub.add_parser(verb, help=text)
        bulk.add_targets(p, done=verb)
        p.set_defaults(func=bulk.each(cmd_simple), verb=verb)

    p = sub.add_parser("remove", help="remove replication on both hosts")
    bulk.add_targets(p)
    p.add_argument("--keep-replica", action="store_true",
                   help="keep the replica VM and its disks on the replica host")
    p.add_argument("--force", action="store_true",
                   help="remove here even if the replica host is unreachable")
    p.set_defaults(func=bulk.each(cmd_remove))

    p = sub.add_parser("resync", help="ship only the blocks that differ from the replica "
                                      "(compares block digests); several VMs run one "
                                      "after the other")
    bulk.add_targets(p)
    p.add_argument("--now", action="store_true", help="do not wait for the resync window")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=bulk.each(cmd_resync))

    p = sub.add_parser("test-connection", help="check that a paired replica answers")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_test_connection)


def _enable_options(p) -> None:
    """`enable`'s options, their defaults those of domain.relationship (imported here:
    every other command line would pay for the module, and a client command is
    milliseconds; see tests/unit/test_launcher.py)."""
    from ..domain.relationship import DEFAULTS, FREQUENCY_TEXT, POINT_INTERVAL_TEXT
    bulk.add_targets(p, "any", done="enable")
    p.add_argument("--replica", required=True, metavar="HOST:PORT")
    p.add_argument("--frequency", default=FREQUENCY_TEXT, choices=["30s", "5m", "15m"])
    p.add_argument("--compression", default=DEFAULTS.compression, choices=["zstd", "none"])
    p.add_argument("--exclude-disk", action="append", default=[], metavar="NAME")
    p.add_argument("--security-tag", default=DEFAULTS.security_tag, metavar="TAG",
                   help="the tag the replica's authorization entry requires")
    p.add_argument("--recovery-history", type=int, default=DEFAULTS.history, metavar="N",
                   help=f"recovery points kept on the replica, 0-24 (default "
                        f"{DEFAULTS.history})")
    p.add_argument("--point-interval", default=POINT_INTERVAL_TEXT, metavar="DURATION",
                   help=f"time between recovery points (default {POINT_INTERVAL_TEXT}; "
                        "e.g. 15m, 30s)")
    p.add_argument("--app-consistent-every", type=int, default=DEFAULTS.app_every, metavar="N",
                   help="every Nth point is app-consistent (guest agent fsfreeze); 0: none")
    p.add_argument("--resync-window", metavar="HH:MM-HH:MM",
                   help="automatic resynchronizations wait for this window (e.g. 18:30-06:00)")
    p.add_argument("--mode", choices=["periodic", "continuous"], default=DEFAULTS.mode,
                   help="continuous: a write-blocking mirror, zero data loss (qemu driver)")
    p.add_argument("--max-stall", type=float, default=DEFAULTS.max_stall, metavar="SECONDS",
                   help="continuous: longest a guest write may wait for the replica")
    p.add_argument("--network-map", action="append", default=[], metavar="SRC=DST",
                   help="an existing libvirt domain's NICs on network or bridge SRC come up "
                        "on DST of the replica host at failover (repeatable; overrides the "
                        "replica server's default map)")
    p.add_argument("--failover-ip", action="append", default=[],
                   metavar="NIC=ADDR/PREFIX[,gw=GW][,dns=A+B]",
                   help="after a failover, once the guest agent answers, set this address "
                        "inside the guest on the NIC (its MAC, or its index: 0 first); "
                        "repeatable, one per NIC; an existing libvirt domain's")
    p.add_argument("--dr", action="store_true",
                   help="a disaster-recovery link (NAME@dr) to a third host, beside the "
                        "VM's main relationship; it follows the VM to that relationship's "
                        "other host")
    p.set_defaults(func=bulk.each(cmd_enable))


def cmd_enable(args) -> int:
    info = client_of(args).call("POST", "/v1/relationships", {
        "vm": args.vm, "replica": args.replica, "frequency": args.frequency,
        "compression": args.compression, "exclude_disks": args.exclude_disk,
        "security_tag": args.security_tag, "history": args.recovery_history,
        "point_interval": args.point_interval, "app_every": args.app_consistent_every,
        "resync_window": args.resync_window, "mode": args.mode, "max_stall": args.max_stall,
        "dr": args.dr, "network_map": args.network_map, "failover_ips": args.failover_ip})
    what = "DR link" if args.dr else "replication"
    print(f"{what} of {info['vm']} to {info['replica']} enabled ({info['state']})"
          + (f"; it follows the VM to {', '.join(info['holders'][1:])}"
             if len(info.get("holders") or []) > 1 else ""))
    for note in info.get("notes") or []:
        print(f"  replica VM: {note}")
    print(f"next: {info['next']}")
    return 0


def cmd_dr_adopt(args) -> int:
    info = client_of(args).call("POST", f"/v1/relationships/{args.vm}/dr-adopt",
                                {"replica": args.replica, "no_resync": args.no_resync})
    if args.json:
        emit_json(info)
        return 0
    print(f"{info['vm']}: this host replicates to {info['replica']} now (epoch {info['epoch']}, "
          f"{info['state']})")
    if "bytes_moved" in info:
        print(f"resynchronized: {format_size(info['bytes_moved'])} moved, "
              f"{format_size(info.get('compared_bytes') or 0)} compared")
    return 0


def _cycle_report(args, kind: str, stats: dict) -> int:
    if args.json:
        emit_json(stats)
        return 0
    raw, wire = stats.get("raw_bytes", 0), stats.get("wire_bytes", 0)
    print(f"{kind} of {args.vm}: cycle {stats['cycle']} acknowledged in "
          f"{duration(stats.get('seconds'))}; {format_size(raw)} changed, "
          f"{format_size(wire)} sent" + ("; replica verified identical" if stats.get("verified")
                                         else ""))
    return 0


def cmd_initial(args) -> int:
    client = client_of(args)
    info = watch(client, f"initial copy of {args.vm}", lambda: client.call(
        "POST", f"/v1/relationships/{args.vm}/initial", {
            "method": args.method, "path": args.path, "at": args.at,
            "import": args.import_dir, "verify": args.verify}),
        vm=args.vm, own=("initial", "resync"), show=not args.json)
    if args.json:
        emit_json(info)
        return 0
    if "scheduled_at" in info:
        import time
        print(f"initial replication of {args.vm} ({info['method']}) scheduled for "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['scheduled_at']))}")
        return 0
    if "imported" in info:
        print(f"seed imported into the replica of {args.vm} from {info['imported']} "
              f"(verified, {info['records']} records)")
        return 0
    if "exported" in info:
        print(f"seed of {args.vm} exported to {info['exported']}: "
              f"{format_size(info['raw_bytes'])} of data, checksummed")
        print(f"next: {info['next']}")
        return 0
    if "bytes_moved" in info:
        print(f"initial replication of {args.vm} from the copy on the replica: "
              f"{format_size(info['bytes_moved'])} moved, "
              f"{format_size(info.get('compared_bytes') or 0)} compared")
        return 0
    return _cycle_report(args, "initial replication", info)


def cmd_sync(args) -> int:
    client = client_of(args)
    path = f"/v1/relationships/{args.vm}/sync" + ("?verify=1" if args.verify else "")
    # (its cycle, or the cycle running when it came, which it waits for: both are shown)
    return _cycle_report(args, "sync", watch(client, f"sync of {args.vm}",
                                             lambda: client.call("POST", path),
                                             vm=args.vm, own=("delta",),
                                             show=not args.json))


def cmd_status(args) -> int:
    q = f"?vm={args.vm}" if args.vm else ""
    info = client_of(args).call("GET", f"/v1/status{q}")
    rels = info["relationships"]
    if args.json:
        emit_json(rels)
        return 0
    if not rels:
        print(f"{info['host']}: no replicated VMs")
        return 0
    table([[r["vm"], r["role"], r["peer"], r["state"], r["health"],
            r.get("mode_label") or r["frequency"],
            ago(r["last_cycle_at"]), duration(r["lag_seconds"])] for r in rels],
          ["VM", "ROLE", "PEER", "STATE", "HEALTH", "MODE", "LAST SYNC", "LAG"])
    for r in rels:
        if r.get("activity"):
            print(f"  {r['vm']}: running: {progress_text(r['activity'])}")
        if r.get("tracking"):
            from ..domain.tracking import text_of  # (dataclasses: not for every command)
            print(f"  {r['vm']}: tracking: " + "; ".join(text_of(t) for t in r["tracking"]))
        for reason in r["reasons"]:
            print(f"  {r['vm']}: {r['health']}: {reason}")
        if r.get("next"):
            print(f"  {r['vm']}: next: {r['next']}")
    return 0


def cmd_simple(args) -> int:
    info = client_of(args).call("POST", f"/v1/relationships/{args.vm}/{args.verb}")
    print(f"{info['vm']}: {info['state']}")
    return 0


def cmd_remove(args) -> int:
    q = []
    if args.keep_replica:
        q.append("keep_replica=1")
    if args.force:
        q.append("force=1")
    client = client_of(args)
    path = f"/v1/relationships/{args.vm}" + ("?" + "&".join(q) if q else "")
    info = watch(client, f"remove {args.vm}", lambda: client.call("DELETE", path),
                 vm=args.vm)
    print(f"replication of {args.vm} removed"
          + (f"; replica side: {info['replica_side']}" if "replica_side" in info else "")
          + (f"; {info['primary_side']}" if info.get("primary_side") else ""))
    if info.get("kept_copy"):
        where = info.get("replica") or "this host"
        print(f"the replica VM is kept; its disks are in {info['kept_copy']} on {where}: a "
              f"later `vmreplica enable {args.vm} --replica HOST` and `vmreplica initial "
              f"{args.vm} --method existing --path {info['kept_copy']}` move only the "
              "differences")
    return 0


def cmd_test_connection(args) -> int:
    info = client_of(args).call("POST", "/v1/test-connection", {"address": args.address})
    if args.json:
        emit_json(info)
        return 0
    print(f"{args.address} is {info['peer']}: round trip {info['round_trip_ms']} ms; "
          f"replica server {'enabled' if info['replica_server'] else 'disabled'}; "
          f"this host {'is' if info['authorized'] else 'is NOT'} authorized there")
    return 0


def cmd_resync(args) -> int:
    client = client_of(args)
    info = watch(client, f"resync of {args.vm}",
                 lambda: client.call("POST", f"/v1/relationships/{args.vm}/resync"
                                     + ("?now=1" if args.now else "")),
                 vm=args.vm, own=("resync",), show=not args.json)
    if args.json:
        emit_json(info)
        return 0
    if info.get("deferred"):
        print(f"resync of {args.vm} will run in its window {info['window']} "
              "(`--now` to run it at once)")
        return 0
    print(f"resync of {args.vm}: {format_size(info['bytes_moved'])} moved, "
          f"{format_size(info.get('compared_bytes') or 0)} compared, in "
          f"{duration(info.get('seconds'))}")
    return 0


def cmd_set(args) -> int:
    body = {k: getattr(args, k) for k in ("frequency", "history", "point_interval", "app_every",
                                          "compression", "resync_window", "mode", "max_stall",
                                          "failover_ips")}
    body.update(exclude_disks=args.exclude_disk, include_disks=args.include_disk)
    info = client_of(args).call("POST", f"/v1/relationships/{args.vm}/settings", body)
    if args.json:
        emit_json(info)
    else:
        changed = ", ".join(f"{k}={v}" for k, v in info.items() if k != "vm")
        print(f"{args.vm}: {changed}")
    return 0
