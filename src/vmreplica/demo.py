"""`make demo`: two hosts on this machine, the demo guest replicated between them.

Every step runs the real CLI (shown as `$ vmreplica ...`) against two real daemons that
talk mutual TLS on loopback. The demo guest writes a numbered record every 100 ms to its
last disk; the demo shows how far the replica is behind and that it is byte-exact.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from . import lab
from .hypervisor.guest import read_demo_records

VM = "demo-vm"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(host: lab.LabHost, *args: str, show: bool = True) -> str:
    print(f"$ vmreplica --home {host.home} {' '.join(shlex.quote(a) for a in args)}", flush=True)
    out = host.run(*args).stdout
    if show and out.strip():
        print("  " + out.rstrip().replace("\n", "\n  "), flush=True)
    return out


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(every)


def records(host: lab.LabHost, vm: str) -> dict:
    return read_demo_records(host.vm(vm)["disks"][-1]["path"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmreplica-demo")
    p.add_argument("--dir", default="demo-run", help="where the two host homes go")
    p.add_argument("--keep", action="store_true", help="leave both hosts running at the end")
    args = p.parse_args(argv)
    root = Path(args.dir).absolute()
    for old in (root / "a", root / "b"):  # a previous run's daemons and VMs
        if (old / "state.db").exists():
            lab.teardown(lab.LabHost(old, old.name))
    if root.exists():
        import shutil
        shutil.rmtree(root)
    root.mkdir(parents=True)
    root.chmod(0o755)

    step("Two hosts on this machine: site-a (primary) and site-b (replica)")
    a = lab.LabHost(root / "a", "site-a")
    b = lab.LabHost(root / "b", "site-b")
    for h in (a, b):
        run(h, "init", "--name", h.name, "--listen", h.address, "--accel", "auto")
        run(h, "serve", "--detach")
    try:
        step("Trust in one command pair: a one-time token on the replica, pinned certificates")
        token = run(b, "trust", "token").strip().splitlines()[-1]
        run(a, "trust", "pair", b.address, token)
        run(b, "replica-server", "enable", "--allow", "site-a")

        step("A VM on site-a running the demo guest (a record every 100 ms on its last disk)")
        run(a, "vm", "create", VM, "--disk", "256M", "--disk", "64M", "--guest", "demo")
        run(a, "vm", "start", VM)
        first = wait_for("the guest's first records", lambda: records(a, VM)["top"])
        print(f"  the guest is writing: record {first} on disk1")

        step("Replicate it to site-b every 30 s: initial copy while it runs, then cycles")
        run(a, "enable", VM, "--replica", b.address, "--frequency", "30s")
        run(a, "initial", VM)
        run(b, "vm", "list")
        for _ in range(2):
            time.sleep(3)
            run(a, "sync", VM)
            on_a, on_b = records(a, VM), records(b, VM)
            print(f"  site-a's disk is at record {on_a['top']}; site-b's replica holds records "
                  f"1..{on_b['contiguous']} with no gap (top {on_b['top']})")
        run(a, "status")
        run(b, "status")

        step("Shut the VM down cleanly, ship the last changes, verify byte for byte")
        run(a, "vm", "stop", VM)
        run(a, "sync", VM, "--verify")
        on_a, on_b = records(a, VM), records(b, VM)
        print(f"  site-a: last record {on_a['top']}; site-b: last record {on_b['top']}, "
              f"records 1..{on_b['contiguous']} present, no gap: "
              f"{'yes' if on_b['gap_at'] is None and on_b['top'] == on_a['top'] else 'NO'}")
        if on_b["top"] != on_a["top"] or on_b["gap_at"] is not None:
            print("demo: the replica does not match the primary", file=sys.stderr)
            return 1
        print("\nThe demo VM is replicated.")
        if args.keep:
            print("Both hosts keep running; explore with, for example:\n"
                  f"  VMREPLICA_HOME={a.home} .venv/bin/vmreplica status\n"
                  f"  VMREPLICA_HOME={b.home} .venv/bin/vmreplica vm show {VM}")
    finally:
        if not args.keep:
            step("Stopping both hosts")
            lab.teardown(a, b)
            print(f"  (homes kept in {root}; `make demo` starts afresh; to explore the running "
                  "hosts: .venv/bin/python -m vmreplica.demo --keep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
