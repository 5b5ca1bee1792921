"""Bulk: every VM verb takes several names, `--all` or `--tag TAG`. One VM named: the
command behaves as for one VM. Several: one line per VM, and a non-zero exit if any
failed (Hyper-V's users script this per VM; here it is built in)."""

from __future__ import annotations

import sys

from .. import errors
from .main import client_of

SCOPES = {
    "unreplicated": lambda v: v["role"] == "none",
    "replicated": lambda v: v["role"] != "none",
    "any": lambda v: True,
}


def add_targets(p, scope: str = "replicated") -> None:
    p.add_argument("vms", nargs="*", metavar="VM")
    p.add_argument("--all", action="store_true", help="every VM this applies to")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="the VMs with this tag (`vm tag`); repeatable")
    p.set_defaults(target_scope=scope)


def targets(args) -> list[str]:
    if not (args.all or args.tag):
        if not args.vms:
            raise errors.UsageError("name at least one VM, or use --all or --tag TAG")
        return list(dict.fromkeys(args.vms))
    vms = client_of(args).call("GET", "/v1/vms")["vms"]
    keep = SCOPES[args.target_scope]
    chosen = [v["name"] for v in vms if keep(v) and
              all(t in (v.get("tags") or []) for t in args.tag)]
    chosen += [n for n in args.vms if n not in chosen]
    if not chosen:
        raise errors.UsageError("no VM matches" + (f" tag {', '.join(args.tag)}" if args.tag
                                                   else ""))
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
        print(f"{done} of {len(names)} VM(s) done" +
              (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
        return 1 if failed else 0
    return run
