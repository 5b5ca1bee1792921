"""Continuous mode benchmark: what a guest write costs without replication, with periodic
replication and with continuous (write-blocking mirror, replica writing through), and how
fast a relationship is back in sync after an outage.

Writes go through the VM's own virtio-blk device (qemu-io in the VM's monitor, `vm io`):
the guest's path, the mirror's filter included. Latency is qemu-io's own measure of each
4 KiB write at queue depth 1 (random offsets); throughput is one 256 MiB sequential write
in 1 MiB requests. The outage row kills the replica daemon and its export for 30 s while
100 MiB of 64 KiB writes land, restarts it, and times the way back to in_sync, with the
bytes the mirror job copied.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from vmreplica.qemutools.qmp import Monitor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the harness
from harness import lab  # noqa: E402

MiB = 1 << 20


class VMIO:
    """qemu-io through the VM's device, timed from here over a monitor connection kept
    open (qemu driver) or through libvirt's monitor pass-through (libvirt driver); the
    round trip of a no-op HMP command is measured and subtracted."""

    def __init__(self, a, vm: str):
        self.mon = self.dom = None
        if a.driver == "libvirt":
            import libvirt
            self.conn = libvirt.open("qemu:///system")
            self.dom = self.conn.lookupByName(f"vmr-{a.name}-{vm}")
            self.cmd = 'qemu-io -d virtio-disk0/virtio-backend "{}"'
        else:
            uuid = a.vm(vm).get("uuid")
            sock = next(p for p in (a.home / "run").glob("*.qmp")
                        if uuid is None or p.name.startswith(uuid[:8]))
            self.mon = Monitor(sock, timeout=600)
            self.cmd = 'qemu-io -d vd-disk0/virtio-backend "{}"'
        base = []
        for _ in range(200):
            t = time.perf_counter()
            self._hmp("info version")
            base.append(time.perf_counter() - t)
        self.overhead = statistics.median(base)

    def _hmp(self, line: str) -> str:
        if self.dom is not None:
            import libvirt_qemu
            return libvirt_qemu.qemuMonitorCommand(
                self.dom, line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return self.mon.execute("human-monitor-command", {"command-line": line})

    def run(self, command: str) -> float:
        t = time.perf_counter()
        out = self._hmp(self.cmd.format(command))
        dt = time.perf_counter() - t
        if "rror" in out:
            raise SystemExit(f"qemu-io: {out}")
        return max(dt - self.overhead, 0.0)

    def close(self):
        if self.mon is not None:
            self.mon.close()
        else:
            self.conn.close()


def latency(a, vm: str, n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    io = VMIO(a, vm)
    try:
        lat = sorted(io.run(f"write -P {rnd.randrange(1, 255)} "
                            f"{rnd.randrange(0, (1 << 30) // 4096) * 4096} 4k") for _ in range(n))
    finally:
        io.close()
    return {"median_us": statistics.median(lat) * 1e6,
            "p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6}


def throughput(a, vm: str, offset: int) -> float:
    io = VMIO(a, vm)
    try:
        t = time.perf_counter()
        for i in range(256):
            io.run(f"write -P 7 {offset + i * MiB} 1M")
        return 256 * MiB / (time.perf_counter() - t)
    finally:
        io.close()


def wait_state(a, vm: str, state: str, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while a.json("status", vm)[0].get("sync_state") != state:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"{vm} did not reach {state}")
        time.sleep(0.1)
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--work", default="bench-run/continuous")
    p.add_argument("--driver", choices=("qemu", "libvirt"), default="qemu",
                   help="libvirt: the mirror goes through the relay (needs libvirtd)")
    args = p.parse_args()
    work = Path(args.work).absolute()
    if args.driver == "libvirt":
        work = work.with_name(work.name + "-libvirt")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o755)
    a, b = lab.two_sites(work, driver=args.driver)
    vm = "lat"
    rows = {}
    print(f"driver: {args.driver}", flush=True)
    try:
        a.run("vm", "create", vm, "--disk", "1G",
              *(["--share-rw"] if args.driver == "qemu" else []))
        a.run("vm", "start", vm)
        io = VMIO(a, vm)                    # allocate every cluster: all rows overwrite
        for i in range(1024):
            io.run(f"write -P 1 {i * MiB} 1M")
        io.close()
        rows["none"] = {**latency(a, vm, args.ops, 1), "seq_Bps": throughput(a, vm, 0)}
        a.run("enable", vm, "--replica", b.address, "--frequency", "30s")
        a.run("initial", vm)
        rows["periodic"] = {**latency(a, vm, args.ops, 2), "seq_Bps": throughput(a, vm, 256 * MiB)}
        a.run("set", vm, "--mode", "continuous")
        wait_state(a, vm, "in_sync")
        rows["continuous"] = {**latency(a, vm, args.ops, 3),
                              "seq_Bps": throughput(a, vm, 512 * MiB)}
        for name, r in rows.items():
            print(f"{name:10}  4 KiB QD1 write latency median {r['median_us']:7.0f} us, "
                  f"p99 {r['p99_us']:7.0f} us;  sequential {r['seq_Bps'] / MiB:7.1f} MiB/s",
                  flush=True)
        over = rows["continuous"]["median_us"] / rows["none"]["median_us"]
        print(f"continuous/none median latency: {over:.2f}x", flush=True)
        # 30 s outage with 100 MiB changed.
        os.kill(b.daemon_pid(), signal.SIGKILL)
        t_out = time.monotonic()
        wait_state(a, vm, "degraded", 20)
        rnd = random.Random(4)
        io = VMIO(a, vm)
        for i in range(1600):                               # 1,600 x 64 KiB = 100 MiB
            off = rnd.randrange(0, (1 << 30) // 65536) * 65536
            io.run(f"write -P {i % 250 + 1} {off} 64k")
        io.close()
        time.sleep(max(0.0, 30 - (time.monotonic() - t_out)))
        sent = a.json("measure", vm)["bytes_raw"]
        b.start()
        back = wait_state(a, vm, "in_sync", 300)
        events = [e["message"] for e in a.json("events", vm) if e["kind"] == "continuous"]
        cycles = a.json("measure", vm)["bytes_raw"] - sent
        print(f"outage 30 s, 100 MiB changed: back in_sync {back:.1f} s after the replica "
              f"returned; catch-up cycles moved {cycles} bytes; last event: "
              f"{events[-1] if events else '-'}", flush=True)
    finally:
        lab.teardown(a, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
