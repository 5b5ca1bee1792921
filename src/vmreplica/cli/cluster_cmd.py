"""`vmreplica cluster`: HA on Pacemaker/Corosync (setup, protect, status, checker, move)."""

from __future__ import annotations

from .. import errors
from .main import client_of
from .render import emit_json, table


def register(sub) -> None:
    p = sub.add_parser("cluster", help="high availability on Pacemaker/Corosync")
    c = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    c.required = True

    s = c.add_parser("setup", help="write (or print) the Corosync and Pacemaker configuration")
    s.add_argument("nodes", nargs=2, metavar="NODE=ADDRESS")
    s.add_argument("--name", default="vmreplica", help="cluster name")
    s.add_argument("--witness", metavar="HOST", help="corosync-qnetd witness (recommended)")
    s.add_argument("--fence-agent", metavar="AGENT",
                   help="fence agent for the nodes (fence_ipmilan, fence_virsh, fence_vmreplica...)")
    s.add_argument("--fence-option", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--no-fencing", action="store_true",
                   help="run without fencing (split brain possible: two copies of a VM)")
    s.add_argument("--write", metavar="DIR",
                   help="write corosync.conf and the seed CIB (cib.xml) into DIR (else print "
                        "corosync.conf and the pcs commands)")
    s.set_defaults(func=cmd_setup)

    s = c.add_parser("protect", help="continuous replication to the other node + a Pacemaker "
                                     "resource for the VM (run on the node where it runs)")
    s.add_argument("vm")
    s.add_argument("--peer", metavar="HOST:PORT", help="the other node's vmreplica address")
    s.add_argument("--homes", required=True, metavar="NODE=HOME,NODE=HOME")
    s.add_argument("--stop-mode", choices=["stop", "save", "off"], default="stop")
    s.add_argument("--stop-timeout", type=int, default=60)
    s.add_argument("--prefer", metavar="NODE")
    # (the daemon's defaults: domain.relationship)
    s.add_argument("--max-stall", type=float)
    s.add_argument("--point-interval")
    s.add_argument("--network-map", action="append", default=[], metavar="SRC=DST",
                   help="an existing libvirt domain's NICs on network or bridge SRC come up "
                        "on DST on the other node (as `enable --network-map`)")
    s.set_defaults(func=cmd_protect)

    s = c.add_parser("status", help="each protected VM's state on each node "
                                    "(PRIM, SECOND, ALONE, WAIT, STOP)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = c.add_parser("checker", help="suspend or resume the VM checker (maintenance)")
    s.add_argument("what", choices=["suspend", "resume"])
    s.add_argument("vm")
    s.set_defaults(func=cmd_checker)

    s = c.add_parser("move", help="move a VM to the other node (planned, zero loss)")
    s.add_argument("vm")
    s.add_argument("node")
    s.set_defaults(func=cmd_move)

    s = c.add_parser("unprotect", help="remove the VM's Pacemaker resource (replication stays)")
    s.add_argument("vm")
    s.set_defaults(func=cmd_unprotect)

    s = c.add_parser("take-over", help="(resource agent) make this node the VM's primary")
    s.add_argument("vm")
    s.set_defaults(func=cmd_take_over)


def cmd_setup(args) -> int:
    from ..cluster import pacemaker
    nodes = []
    for spec in args.nodes:
        name, _, addr = spec.partition("=")
        if not name or not addr:
            raise errors.UsageError(f"invalid node {spec!r}", hint="use NODE=ADDRESS")
        nodes.append((name, addr))
    if not args.fence_agent and not args.no_fencing:
        raise errors.UsageError(
            "no fencing configured: without it, a node that only lost the network keeps "
            "its VMs running while the other node starts them too — two copies of each VM "
            "writing to diverging disks (split brain)",
            hint="give --fence-agent (fence_ipmilan, fence_virsh, ...), or --no-fencing if you "
                 "accept that risk")
    options = {}
    for opt in args.fence_option:
        k, _, v = opt.partition("=")
        if not k or not _:
            raise errors.UsageError(f"invalid --fence-option {opt!r}", hint="use KEY=VALUE")
        options[k] = v
    conf = pacemaker.corosync_conf(args.name, nodes, args.witness)
    if args.write:
        from pathlib import Path
        d = Path(args.write)
        d.mkdir(parents=True, exist_ok=True)
        (d / "corosync.conf").write_text(conf)
        (d / "cib.xml").write_text(pacemaker.cib_bootstrap(
            args.name, [n for n, _ in nodes], args.fence_agent, options,
            two_node=not args.witness))
        print(f"wrote {d / 'corosync.conf'}: copy it to /etc/corosync/corosync.conf on both "
              "nodes (with the same /etc/corosync/authkey: corosync-keygen on one, copy it)")
        print(f"wrote {d / 'cib.xml'}: before Pacemaker's first start, copy it to "
              "/var/lib/pacemaker/cib/cib.xml on both nodes (owner hacluster:haclient, mode "
              "0600); or load it into a running cluster: cibadmin --replace --xml-file "
              f"{d / 'cib.xml'}")
        if args.witness:
            print(f"witness {args.witness}: run corosync-qnetd there and exchange the "
                  "certificates (corosync-qnetd-certutil -i; corosync-qdevice-net-certutil "
                  "-i/-r/-M on the first node, -m on the second), then start "
                  "corosync-qdevice on both nodes")
    else:
        print(conf)
        print("# Pacemaker (pcs):")
        for c in pacemaker.pcs_commands(nodes, args.fence_agent, args.fence_option):
            print(c)
    if args.no_fencing:
        print("# WARNING: no fencing — a split brain can run a VM on both nodes", flush=True)
    return 0


def cmd_protect(args) -> int:
    info = client_of(args).call("POST", "/v1/cluster/protect", {
        "vm": args.vm, "peer": args.peer, "homes": args.homes, "stop_mode": args.stop_mode,
        "stop_timeout": args.stop_timeout, "prefer": args.prefer,
        "max_stall": args.max_stall, "point_interval": args.point_interval,
        "network_map": args.network_map})
    print(f"{info['vm']} protected by the cluster as {info['resource']} "
          f"(stop mode {info['stop_mode']})")
    return 0


def cmd_status(args) -> int:
    st = client_of(args).call("GET", "/v1/cluster/status")
    if args.json:
        emit_json(st)
        return 0
    print("nodes: " + ", ".join(f"{n} {'online' if up else 'OFFLINE'}"
                                for n, up in st["nodes"].items())
          + f"; quorum: {'yes' if st['quorum'] else 'NO'}")
    nodes = list(st["nodes"])
    table([[v["vm"], ",".join(v["running_on"]) or "-"] + [v["states"].get(n, "-") for n in nodes]
           for v in st["vms"]], ["VM", "RUNS ON"] + [n.upper() for n in nodes])
    return 0


def _action(args, what: str, body: dict | None = None) -> int:
    client_of(args).call("POST", f"/v1/cluster/vms/{args.vm}/{what}", body or {})
    print(f"{args.vm}: {what.replace('-', ' ')} done")
    return 0


def cmd_checker(args) -> int:
    return _action(args, f"checker-{args.what}")


def cmd_move(args) -> int:
    return _action(args, "move", {"node": args.node})


def cmd_unprotect(args) -> int:
    return _action(args, "unprotect")


def cmd_take_over(args) -> int:
    info = client_of(args).call("POST", f"/v1/relationships/{args.vm}/take-over")
    print(f"{args.vm}: this node is the primary ({info['how']})")
    return 0
