"""vm commands: create, list, show, start, stop, delete."""

from __future__ import annotations

from . import bulk
from .main import client_of
from .render import emit_json, size, table


def register(sub) -> None:
    p = sub.add_parser("vm", help="manage this host's virtual machines")
    vsub = p.add_subparsers(dest="vm_command", metavar="ACTION")
    vsub.required = True
    c = vsub.add_parser("create", help="create a VM with qcow2 disks")
    c.add_argument("name")
    c.add_argument("--disk", action="append", required=True, metavar="SIZE",
                   help="add a disk of SIZE (e.g. 8G); repeatable")
    c.add_argument("--memory", type=int, default=256, metavar="MB")
    c.add_argument("--guest", choices=["demo"], help="boot the built-in demo guest")
    c.add_argument("--format", default="qcow2", choices=["qcow2", "raw"],
                   help="disk image format (replication tracks changes in qcow2)")
    c.add_argument("--share-rw", action="store_true",
                   help="let `vm io` write to the disks of the running VM (benchmarks)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_create)
    ls = vsub.add_parser("list", help="list VMs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    s = vsub.add_parser("show", help="show a VM and its disks")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = vsub.add_parser("start", help="start VMs")
    bulk.add_targets(s, "any", done="start")
    s.set_defaults(func=bulk.each(cmd_start))
    s = vsub.add_parser("stop", help="shut VMs down (--force: power off at once)")
    bulk.add_targets(s, "any", done="stop")
    s.add_argument("--force", action="store_true")
    s.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long a clean shutdown may take before power-off (default 60)")
    s.set_defaults(func=bulk.each(cmd_stop))
    s = vsub.add_parser("check", help="the VM checker: process, QMP run state, guest agent")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check)
    s = vsub.add_parser("save", help="save a running VM's state to disk and stop it; the next "
                                     "start resumes it")
    s.add_argument("name")
    s.set_defaults(func=cmd_save)
    s = vsub.add_parser("delete", help="delete stopped VMs and their disks")
    bulk.add_targets(s, "any")
    s.set_defaults(func=bulk.each(cmd_delete))
    s = vsub.add_parser("io", help="run a qemu-io command on a running VM's disk through its "
                                   "device (needs vm create --share-rw; for benchmarks)")
    s.add_argument("name")
    s.add_argument("disk")
    s.add_argument("command", help='e.g. "write -P 1 0 4k"')
    s.set_defaults(func=cmd_io)
    s = vsub.add_parser("tag", help="add or remove tags (used by --tag in bulk commands)")
    bulk.add_targets(s, "any")
    s.add_argument("--add", action="append", default=[], metavar="TAG")
    s.add_argument("--remove", action="append", default=[], metavar="TAG")
    s.set_defaults(func=bulk.each(cmd_tag))


def cmd_create(args) -> int:
    vm = client_of(args).call("POST", "/v1/vms", {"name": args.name, "disks": args.disk,
                                                  "memory_mb": args.memory, "guest": args.guest,
                                                  "format": args.format,
                                                  "share_rw": args.share_rw})
    if args.json:
        emit_json(vm)
    else:
        print(f"VM {vm['name']} created ({len(vm['disks'])} disk(s)); start it with "
              f"`vmreplica vm start {vm['name']}`")
    return 0


def cmd_list(args) -> int:
    vms = client_of(args).call("GET", "/v1/vms")["vms"]
    if args.json:
        emit_json(vms)
        return 0
    table([[v["name"], v["state"], v["role"], v.get("origin") or "vmreplica", len(v["disks"]),
            size(sum(d["virtual_size"] for d in v["disks"])), ",".join(v.get("tags") or [])]
           for v in vms], ["VM", "STATE", "ROLE", "ORIGIN", "DISKS", "SIZE", "TAGS"])
    return 0


def cmd_show(args) -> int:
    vm = client_of(args).call("GET", f"/v1/vms/{args.name}")
    if args.json:
        emit_json(vm)
        return 0
    print(f"{vm['name']}: {vm['state']}, role {vm['role']}, {vm['memory_mb']} MB"
          + (f", guest {vm['guest']}" if vm.get("guest") else "")
          + (", an existing libvirt domain" if vm.get("origin") == "existing" else ""))
    table([[d["name"], d["format"], size(d["virtual_size"]), d["path"]] for d in vm["disks"]],
          ["DISK", "FORMAT", "SIZE", "PATH"])
    if vm.get("nics"):
        print("NICs: " + ", ".join(f"{i}={m}" for i, m in enumerate(vm["nics"])))
    if vm.get("failover_ips"):
        print("failover IPs: " + "; ".join(vm["failover_ips"]))
    reip = vm.get("reip")
    if reip and reip.get("state") != "failed":
        print(f"re-IP of {reip['vm']}: {reip['state']}: {reip.get('message') or ''}")
    for w in vm.get("warnings") or []:
        print(f"warning: {w}")
    return 0


def cmd_check(args) -> int:
    c = client_of(args).call("GET", f"/v1/vms/{args.name}/check")
    if args.json:
        emit_json(c)
    else:
        print(f"{args.name}: process {'up' if c['process'] else 'DOWN'}, QMP {c['qmp'] or '-'}, "
              f"guest agent {c['agent'] or '-'}"
              + (f" (hypervisor: {c['state']})" if c.get("state") else ""))
    return 0


def cmd_save(args) -> int:
    info = client_of(args).call("POST", f"/v1/vms/{args.name}/save")
    print(f"{args.name}: state saved to {info['saved']}; stopped")
    return 0


def cmd_io(args) -> int:
    out = client_of(args).call("POST", f"/v1/vms/{args.name}/io",
                               {"disk": args.disk, "command": args.command})
    print(out["output"].rstrip())
    return 0


def cmd_tag(args) -> int:
    vm = client_of(args).call("POST", f"/v1/vms/{args.vm}/tags",
                              {"add": args.add, "remove": args.remove})
    print(f"{vm['name']}: tags {', '.join(vm['tags']) or '(none)'}")
    return 0


def cmd_start(args) -> int:
    from .render import watch
    client = client_of(args)
    # On a terminal: what a slow start waits for (a cycle of the VM; on the first start
    # on this machine, the KVM probe).
    vm = watch(client, f"start {args.vm}",
               lambda: client.call("POST", f"/v1/vms/{args.vm}/start"), vm=args.vm)
    print(f"{vm['name']}: {vm['state']}")
    return 0


def cmd_stop(args) -> int:
    q = "?force=1" if args.force else f"?timeout={args.timeout}"
    vm = client_of(args).call("POST", f"/v1/vms/{args.vm}/stop{q}")
    print(f"{vm['name']}: {vm['state']}")
    return 0


def cmd_delete(args) -> int:
    client_of(args).call("DELETE", f"/v1/vms/{args.vm}")
    print(f"VM {args.vm} deleted")
    return 0
