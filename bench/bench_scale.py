"""Scale: N powered-off VMs replicating every 30 s for a bounded window, after a
synthetic cycle history of H hours (issue 20).

Two hosts on this machine (the qemu driver, tests/harness/lab.py). N VMs with a 32 MiB
disk each are created on the primary, enabled at 30 s and copied; then both daemons
stop while H hours of cycles per VM (one every 30 s, on its slots) are written into
each host's state database through the store's own interface (Store.start_cycle /
finish_cycle, with their times), and start again (the first hourly pass rolls what
is older than a day up into per-hour aggregates). After a warm-up the window runs:
``--write-mib`` of new data per VM per cycle (qemu-io on the image between cycles),
the CPU time of each daemon and of every helper it started (/proc utime+stime+cutime+
cstime of the daemon and of its live descendants: the storage daemons, the kept ones
included), the replica's resident memory
(the daemon and its children) per VM, the scheduled cycles done and late (started
over 1 s after their slot) against the slots due in the window, and the time the
management API takes to answer `status` (median of 5, in this process, after the
window; ``status_cli_ms``: the whole `vmreplica status --json` command).

    python bench/bench_scale.py [--vms 100] [--history-hours 48] [--minutes 5]

It prints one line:
``scale_vms=N history_h=H primary_cpu_pct=… replica_cpu_pct=… rss_mib_per_vm=…
cycles_done=… cycles_expected=… late=… status_ms=…`` (and a few more figures).
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the harness
sys.path.insert(0, str(ROOT / "src"))
from harness import lab  # noqa: E402
from vmreplica.cli.client import Client  # noqa: E402
from vmreplica.domain import schedule  # noqa: E402
from vmreplica.domain.history import LATE_AFTER  # noqa: E402
from vmreplica.service.home import Home  # noqa: E402
from vmreplica.service.store import Store  # noqa: E402

FREQUENCY = 30
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, of the children it waited for, and of its descendants
    alive now (long-lived helpers: the primary's at-rest storage daemon, the replica's
    head servers — their time reaches the parent's cutime only when they exit). A
    helper alive at both ends of the window counts its time in between; one that ended
    in between, at the second reading, in its parent's cutime."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                        # (ended meanwhile: in its parent's cutime)
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants now."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def write_history(home: Path, vms: list[str], hours: float, until: float) -> int:
    """H hours of good cycles per VM, on its slots, through the store's interface."""
    store = Store(home / "state.db")
    rng = random.Random(20)
    n = 0
    with store.transaction():
        for vm in vms:
            k = schedule.slot_index(vm, FREQUENCY, until - hours * 3600) + 1
            while (due := schedule.slot_time(vm, FREQUENCY, k)) < until:
                start = due + rng.uniform(0.01, 0.3)
                row = store.start_cycle(vm, k, "delta", slot=due, at=start)
                store.finish_cycle(row, True, 1 << 20, 300_000, 16,
                                   at=start + rng.uniform(0.3, 1.2))
                k += 1
                n += 1
    store.close()
    return n


def writer(disks: dict[str, str], mib: int, stop: threading.Event, counts: dict) -> None:
    """``mib`` MiB of new data per VM per 30 s, spread over the period (qemu-io on the
    powered-off VM's image; a cycle holding the image's lock: tried again shortly)."""
    rng = random.Random(7)
    names = sorted(disks)
    gap = FREQUENCY / max(1, len(names))
    while not stop.is_set():
        for vm in names:
            if stop.wait(gap):
                return
            off = rng.randrange(0, 31) << 20
            for _ in range(5):
                p = subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                    f"write -P {rng.randrange(1, 250)} {off} {mib}M",
                                    disks[vm]], capture_output=True)
                if p.returncode == 0:
                    counts["writes"] += 1
                    break
                time.sleep(0.3)
            else:
                counts["write_failures"] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--history-hours", type=float, default=48.0)
    ap.add_argument("--minutes", type=float, default=5.0, help="the measured window")
    ap.add_argument("--warmup", type=float, default=45.0, help="seconds before the window")
    ap.add_argument("--write-mib", type=int, default=1)
    ap.add_argument("--work", default="bench-run/scale")
    args = ap.parse_args()
    root = Path(args.work).absolute()
    subprocess.run(["rm", "-rf", str(root)], check=True)
    a, b = lab.two_sites(root, names=("scale-a", "scale-b"))
    vms = [f"s{i:03d}" for i in range(args.vms)]
    disks: dict[str, str] = {}
    stop = threading.Event()
    counts = {"writes": 0, "write_failures": 0}
    try:
        for vm in vms:
            a.run("vm", "create", vm, "--disk", "32M")
            disks[vm] = a.vm(vm)["disks"][0]["path"]
            a.run("enable", vm, "--replica", b.address, "--frequency", "30s")
            a.run("initial", vm)
        a.stop()
        b.stop()
        now = time.time()
        rows = sum(write_history(h.home, vms, args.history_hours, now - 60) for h in (a, b))
        a.start()
        b.start()
        pa, pb = a.daemon_pid(), b.daemon_pid()
        assert pa and pb
        if args.write_mib:
            threading.Thread(target=writer, args=(disks, args.write_mib, stop, counts),
                             daemon=True).start()
        time.sleep(args.warmup)
        w0, ca, cb = time.time(), cpu_seconds(pa), cpu_seconds(pb)
        time.sleep(args.minutes * 60)
        w1, ca1, cb1 = time.time(), cpu_seconds(pa), cpu_seconds(pb)
        rss = rss_mib(pb)
        stop.set()
        client = Client(Home.resolve(str(a.home)))
        times = []
        for _ in range(5):
            t = time.monotonic()
            client.call("GET", "/v1/status")
            times.append((time.monotonic() - t) * 1000)
        t = time.monotonic()
        a.run("status", "--json")
        status_cli_ms = (time.monotonic() - t) * 1000
        db = sqlite3.connect(f"file:{a.home / 'state.db'}?mode=ro", uri=True)
        # slots due in the window, and over by its end with their cycle's start
        expected = sum(len(range(schedule.slot_index(vm, FREQUENCY, w0) + 1,
                                 schedule.slot_index(vm, FREQUENCY, w1 - 5) + 1))
                       for vm in vms)
        done = db.execute("SELECT COUNT(*), SUM(started_at - slot > ?) FROM cycles "
                          "WHERE slot > ? AND slot <= ? AND ok = 1",
                          (LATE_AFTER, w0, w1 - 5)).fetchone()
        failed = db.execute("SELECT COUNT(*) FROM cycles WHERE started_at >= ? AND "
                            "started_at <= ? AND ok = 0", (w0, w1)).fetchone()[0]
        kept = db.execute("SELECT COUNT(*) FROM cycles").fetchone()[0]
        hours = db.execute("SELECT COUNT(*) FROM cycle_hours").fetchone()[0]
        db.close()
    finally:
        stop.set()
        lab.teardown(a, b)
    wall = w1 - w0
    print(f"scale_vms={args.vms} history_h={args.history_hours:g} "
          f"primary_cpu_pct={100 * (ca1 - ca) / wall:.1f} "
          f"replica_cpu_pct={100 * (cb1 - cb) / wall:.1f} "
          f"rss_mib_per_vm={rss / args.vms:.1f} cycles_done={done[0]} "
          f"cycles_expected={expected} late={done[1] or 0} "
          f"status_ms={statistics.median(times):.0f}")
    print(f"window_s={wall:.0f} failed={failed} status_cli_ms={status_cli_ms:.0f} "
          f"history_rows_written={rows} primary_cycle_rows={kept} "
          f"primary_hour_rows={hours} writes={counts['writes']} "
          f"write_failures={counts['write_failures']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
