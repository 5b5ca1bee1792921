"""Benchmark of issue 19's speed line: one delta cycle of a running libvirt domain against
one `virtnbdbackup` incremental of a twin domain.

Scenario: two existing libvirt domains — an operator's, defined with `virsh define`, no
vmreplica metadata — booting the demo guest (its kernel and initramfs: it runs and keeps
writing its 512-byte records to its disk, ten a second, each flushed), each with one
8 GiB qcow2 disk holding 2 GiB of data (incompressible, in 64 MiB runs), the twin's disk
a copy of the first's. An existing domain is what an operator protects on a libvirt
host (issue 19); no guest agent channel, so neither tool freezes file systems.

- `spd-a` replicates the first domain to `spd-b` (two hosts of this machine sharing the
  system libvirtd: `enable`, `initial`); `virtnbdbackup -l full` backs the twin up into a
  local folder.
- Then, each round: the same 1,024 scattered 64 KiB writes (64 MiB, qemu-io fill
  patterns, the same offsets) into both running domains, through each domain's own disk
  device (HMP `qemu-io -d virtio-disk0`: the guest's block backend, tracked like a guest
  write); then, alternately first and second so both see the same load,
  - `vmreplica sync VM --json` (the whole command as an operator runs it: CLI start to
    a cycle the replica has staged and fsynced and acknowledged; the replica applies it
    into its head and flushes right after the ack, off the command's time: printed as
    "apply after the ack", and waited for, with the checkpoint, before anything else is
    timed), and
  - `virtnbdbackup -d TWIN -l inc -o FOLDER` (the whole command; it writes its output
    through the page cache and does not sync it).
  Dirty pages are written back (`sync`) before each timed command, so neither pays for
  the other's writes.
- After the rounds, one `sync --verify` (not timed) proves the replica equals the
  frozen point.

Prints every round's figures, the medians, the ratio and where the median cycle's time
went (the phases the cycle records, `--json`), and ends with
`ratio_vs_virtnbdbackup=X`.

    python bench/bench_libvirt_cycle.py [--rounds 7] [--work /tmp/vmr-bench-lvcycle]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the harness
from harness import lab  # noqa: E402

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
URI = "qemu:///system"
NAMES = ("spd-a", "spd-b")
ROOT = Path(__file__).resolve().parents[1]


def sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode:
        raise SystemExit(f"virsh {' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc


def ensure_virtnbdbackup() -> str:
    """virtnbdbackup from Debian (12 has 1.9.15), installed if missing."""
    exe = shutil.which("virtnbdbackup")
    if exe is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "virtnbdbackup"], check=True,
                       capture_output=True, env=env, timeout=900)
        exe = shutil.which("virtnbdbackup")
        if exe is None:
            raise SystemExit("virtnbdbackup is not installed and apt-get did not install it")
    return exe


def version(exe: str) -> str:
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip().splitlines()[-1] if proc.returncode == 0 \
        else "unknown version"


def fill(disk: Path, alloc: int, size: int) -> None:
    """``alloc`` bytes of incompressible data spread over the disk in 64 MiB runs."""
    rand = disk.with_name("rand64m")
    rand.write_bytes(random.Random(1).randbytes(64 * MiB))
    runs = alloc // (64 * MiB)
    stride = size // runs
    cmds: list[str] = []
    for i in range(runs):
        cmds += ["-c", f"write -s {rand} {i * stride} {64 * MiB}"]
    sh("qemu-io", "-f", "qcow2", *cmds, str(disk))
    rand.unlink()


def domain_xml(name: str, disk: Path) -> str:
    """An operator's domain: the demo guest's kernel and initramfs, one virtio disk."""
    from vmreplica.hypervisor.guest import guest_files
    g = guest_files("demo")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{g['kernel']}</kernel><initrd>{g['initrd']}</initrd>
    <cmdline>{g['cmdline']}</cmdline></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{disk.with_suffix(".console")}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def undefine(name: str) -> None:
    if virsh("domstate", name, check=False).returncode != 0:
        return
    virsh("destroy", name, check=False)
    virsh("undefine", name, "--checkpoints-metadata", check=False)


class Writer:
    """Writes into a running domain through its own disk device (HMP qemu-io)."""

    def __init__(self, name: str):
        import libvirt
        import libvirt_qemu
        self._qemu = libvirt_qemu
        self._hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        self.conn = libvirt.open(URI)
        self.dom = self.conn.lookupByName(name)
        # (the disk device is virtio-blk-pci, a proxy: its backend holds the drive)
        self.device = "/machine/peripheral/virtio-disk0/virtio-backend"
        self.error: str | None = None

    def write(self, commands: list[str]) -> None:
        """(On a thread of its own: a failure is kept in ``error``.)"""
        for c in commands:
            out = self._qemu.qemuMonitorCommand(self.dom, f'qemu-io -d {self.device} "{c}"',
                                                self._hmp)
            if out.strip():
                self.error = f"qemu-io {c!r} on {self.dom.name()}: {out.strip()}"
                return

    def close(self) -> None:
        self.conn.close()


def scatter_commands(seed: int, size: int) -> list[str]:
    """1,024 writes of 64 KiB at random 64 KiB-aligned places of the whole disk."""
    rnd = random.Random(seed)
    offsets = rnd.sample(range(size // (64 * KiB)), 1024)
    return [f"write -P {i % 250 + 1} {o * 64 * KiB} {64 * KiB}" for i, o in enumerate(offsets)]


def timed(*args: str) -> tuple[float, str]:
    """Wall time of a whole command, dirty pages written back first."""
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return took, proc.stdout


def checkpoint_wait(b, vm: str, timeout: float = 60.0) -> None:
    """Until the replica has checkpointed the cycle (its hash index synced, the staged
    cycle dropped: replica/checkpoint.py), so that disk work disturbs no timed command."""
    staging = b.home / "staging" / vm
    t0 = time.perf_counter()
    while any(staging.glob("cycle-*.stage")):
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"the replica kept a staged cycle of {vm} for {timeout:.0f} s")
        time.sleep(0.005)


def replica_intake(b, vm: str) -> float:
    """Seconds the replica's last cycle of ``vm`` took, from its start (the header read)
    to its history row written after the apply (read from its state store)."""
    import sqlite3
    db = sqlite3.connect(f"file:{b.home / 'state.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT started_at, finished_at FROM cycles WHERE vm=? "
                         "ORDER BY id DESC LIMIT 1", (vm,)).fetchone()
    finally:
        db.close()
    return row[1] - row[0]


def parts(stats: dict, wall: float, applied: float) -> dict[str, float]:
    """Where one cycle's time went, in seconds (the replica's receive overlaps the reads;
    ``applied``: the replica's intake, receive to applied, replica_intake)."""
    r = stats.get("replica", {})
    out = {"CLI + management API (outside the cycle)": wall - stats["seconds"]}
    out.update({f"primary: {k}": v for k, v in stats.get("phases", [])})
    out.update({
        "primary: freeze (total)": stats["freeze_seconds"],
        "primary: read+checksum+compress (overlapping the send)":
            r.get("primary_read_seconds", 0.0),
        "replica: receive+verify (overlapping)": r.get("receive_seconds", 0.0),
        "replica: stage fsync": r.get("stage_seconds", 0.0),
        "replica: apply after the ack (not in the command)":
            applied - r.get("receive_seconds", 0.0) - r.get("stage_seconds", 0.0),
        "primary: ship to ack (total)": r.get("ack_seconds", 0.0),
        "primary: after the ack (record, release checkpoint, end backup)":
            stats["seconds"] - stats["freeze_seconds"] - r.get("ack_seconds", 0.0),
    })
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--work", default="/tmp/vmr-bench-lvcycle",
                   help="a folder directly under /tmp (libvirt-qemu must reach it)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds the disks get after the set-up's writes, before timing")
    args = p.parse_args()
    exe = ensure_virtnbdbackup()
    sh("bash", str(ROOT / "scripts" / "start-libvirtd.sh"))
    lab.sweep_stale_domains()
    work = Path(args.work).absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chmod(work, 0o755)       # libvirt-qemu must reach the disks
    lab.claim_root(work)        # (a killed run's domains are swept by the next one)
    tag = secrets.token_hex(3)
    vm, twin = f"spd-{tag}", f"spd-{tag}-twin"
    disks = work / "disks"
    disks.mkdir()
    os.chmod(disks, 0o755)
    disk, twin_disk = disks / f"{vm}.qcow2", disks / f"{twin}.qcow2"
    size = 8 * GiB
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size))
    fill(disk, 2 * GiB, size)
    sh("cp", "--sparse=always", str(disk), str(twin_disk))
    backups = work / "virtnbdbackup"
    print(f"virtnbdbackup {version(exe)}; domains {vm} (vmreplica) and {twin} "
          "(virtnbdbackup): demo guest running, 8 GiB qcow2, 2 GiB allocated", flush=True)

    a, b = lab.two_sites(work / "hosts", driver="libvirt", names=NAMES)
    writers: list[Writer] = []
    try:
        for name, path in ((vm, disk), (twin, twin_disk)):
            xml = work / f"{name}.xml"
            xml.write_text(domain_xml(name, path))
            virsh("define", str(xml))
            virsh("start", name)
        writers = [Writer(vm), Writer(twin)]
        a.run("enable", vm, "--replica", b.address, "--frequency", "15m")
        a.run("initial", vm)
        sh(exe, "-d", twin, "-l", "full", "-o", str(backups), timeout=900)
        os.sync()
        time.sleep(args.settle)

        syncs: list[float] = []
        incs: list[float] = []
        breakdown: list[dict[str, float]] = []
        for r in range(args.rounds):
            cmds = scatter_commands(1000 + r, size)
            both = [threading.Thread(target=w.write, args=(cmds,)) for w in writers]
            for t in both:
                t.start()
            for t in both:
                t.join()
            for w in writers:
                if w.error:
                    raise SystemExit(w.error)
            order = ("sync", "inc") if r % 2 == 0 else ("inc", "sync")
            for which in order:
                if which == "sync":
                    took, out = timed(*lab.cli_path(), "--home", str(a.home), "sync", vm,
                                      "--json")
                    stats = json.loads(out)
                    if stats["raw_bytes"] < 64 * MiB:
                        raise SystemExit(f"round {r}: the cycle moved {stats['raw_bytes']} "
                                         "bytes, less than the 64 MiB written")
                    syncs.append(took)
                    checkpoint_wait(b, vm)
                    breakdown.append(parts(stats, took, replica_intake(b, vm)))
                else:
                    took, _ = timed(exe, "-d", twin, "-l", "inc", "-o", str(backups))
                    incs.append(took)
            print(f"round {r + 1}: vmreplica sync {syncs[-1]:.3f} s, virtnbdbackup -l inc "
                  f"{incs[-1]:.3f} s, ratio {incs[-1] / syncs[-1]:.2f} "
                  f"({' first, '.join(order)} second)", flush=True)
            print("  sync: " + ", ".join(f"{k.split(': ', 1)[-1]} {x:.3f}"
                                         for k, x in breakdown[-1].items()), flush=True)

        check = a.json("sync", vm, "--verify")
        if not check.get("verified"):
            raise SystemExit("sync --verify: the replica differs from the frozen point")
        s, v = statistics.median(syncs), statistics.median(incs)
        print(f"vmreplica sync: median {s:.3f} s (rounds: "
              f"{' '.join(f'{x:.3f}' for x in syncs)})")
        print(f"virtnbdbackup -l inc: median {v:.3f} s (rounds: "
              f"{' '.join(f'{x:.3f}' for x in incs)})")
        mid = sorted(range(len(syncs)), key=syncs.__getitem__)[len(syncs) // 2]
        print(f"where the time went: the median cycle ({syncs[mid]:.3f} s, round {mid + 1}), "
              "and each part's median over the rounds:")
        for k, x in breakdown[mid].items():
            each = statistics.median(p.get(k, 0.0) for p in breakdown)
            print(f"  {k:72} {x:.3f}  {each:.3f}")
        print("replica verified equal to the frozen point (sync --verify)")
        print(f"ratio_vs_virtnbdbackup={v / s:.2f}")
    finally:
        for w in writers:
            w.close()
        for name in (vm, twin):
            virsh("destroy", name, check=False)
        lab.teardown(a, b)
        for name in (vm, twin):
            undefine(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
