"""Bulk: every VM verb takes several names, `--all` or `--tag TAG`. One VM named: the
command behaves as for one VM. Several: one line per VM, and a non-zero exit if any
failed (Hyper-V's users script this per VM; here it is built in).

One rule for every verb: a VM chosen by `--all`/`--tag` that the verb has nothing to do
for (already enabled, seeded, suspended, running, ...; or not replicated, for a
replication verb) is reported `skipped` with why, and is no failure; a VM named on the
command line gets the verb's own answer (enabling it twice fails)."""

from __future__ import annotations

import sys

from .. import errors
from .main import client_of

# Why a VM that --all/--tag chose is skipped (None: the verb applies to it). ``v`` is the
# VM as `vm list` has it, ``r`` its relationship on this host as `status` has it, or None.
SCOPES = {
    "replicated": lambda v, r: None if r else "not replicated",
    "any": lambda v, r: None,
}
DONE = {
    "enable": lambda v, r: r and f"already replicated ({r['role']}, peer {r['peer']}, "
                                 f"{r['state']})",
    "initial": lambda v, r: r and (f"{r['role']} here: `initial` runs on the primary"
                                   if r["role"] != "primary" else
                                   f"already seeded ({r['state']})"
                                   if r["state"] != "ready_for_initial" else None),
    "suspend": lambda v, r: r and r["state"] == "suspended" and "already suspended",
    "resume": lambda v, r: r and r["state"] != "suspended" and f"not suspended ({r['state']})",
    "start": lambda v, r: v.get("state") == "running" and "already running",
    "stop": lambda v, r: v.get("state") == "stopped" and "already stopped",
}


def add_targets(p, scope: str = "replicated", done: str | None = None) -> None:
    """``scope``: the VMs a verb is for; ``done``: the key in DONE saying which of those
    it has nothing to do for (both only for --all/--tag: see the module's rule)."""
    p.add_argument("vms", nargs="*", metavar="VM")
    p.add_argument("--all", action="store_true", help="every VM this applies to")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="the VMs with this tag (`vm tag`); repeatable")
    p.set_defaults(target_scope=scope, target_done=done)


def targets(args) -> list[str]:
    if not (args.all or args.tag):
        if not args.vms:
            raise errors.UsageError("name at least one VM, or use --all or --tag TAG")
        return list(dict.fromkeys(args.vms))
    client = client_of(args)
    vms = [v for v in client.call("GET", "/v1/vms")["vms"]
           if all(t in (v.get("tags") or []) for t in args.tag)]
    if not vms and not args.vms:
        raise errors.UsageError("no VM matches" + (f" tag {', '.join(args.tag)}" if args.tag
                                                   else ""))
    rels = {r["vm"]: r for r in client.call("GET", "/v1/status")["relationships"]}
    done = DONE.get(getattr(args, "target_done", None) or "", lambda v, r: None)
    chosen, skipped = [], []
    for v in vms:
        r = rels.get(v["name"])
        why = SCOPES[args.target_scope](v, r) or done(v, r)
        if why:
            skipped.append(v["name"])
            print(f"{v['name']}: skipped: {why}", flush=True)
        else:
            chosen.append(v["name"])
    chosen += [n for n in args.vms if n not in chosen]
    args.skipped = skipped
    return chosen


def each(fn):
    """Wrap a one-VM command function (it reads ``args.vm``) into a bulk one."""
    def run(args) -> int:
        names = targets(args)
        if len(names) == 1 and not (args.all or args.tag):
            args.vm = names[0]
            return fn(args)
        failed = []
        for name in names:
            import copy
            one = copy.copy(args)
            one.vm = name
            try:
                rc = fn(one)
            except errors.VmreplicaError as e:
                rc = e.exit_code
                print(f"{name}: FAILED: {e.message}" + (f" ({e.hint})" if e.hint else ""),
                      file=sys.stderr, flush=True)
            if rc:
                failed.append(name)
        done = len(names) - len(failed)
        skipped = getattr(args, "skipped", [])
        print(f"{done} of {len(names)} VM(s) done" +
              (f"; failed: {', '.join(failed)}" if failed else "") +
              (f"; {len(skipped)} skipped: {', '.join(skipped)}" if skipped else ""),
              flush=True)
        return 1 if failed else 0
    return run
