#!/bin/bash
# Manual end-to-end check of the demo guest (not part of the test suite): boots it under
# QEMU/TCG and checks the record writer, the guest agent, reboot continuity, 2 disks,
# the ACPI power button and a full disk. Takes about 3 minutes.
#
# Usage: bash scripts/try-guest.sh [GUESTDIR]        (default: guest/demo, built if missing)
# Scratch files go to a temporary directory under /tmp, removed at exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
GUEST=${1:-$here/../guest/demo}
if [ ! -f "$GUEST/initramfs.img" ] || [ ! -f "$GUEST/vmlinuz" ]; then
    bash "$here/build-guest.sh" "$GUEST"
fi
GUEST=$(cd "$GUEST" && pwd)
SCRATCH=$(mktemp -d /tmp/vmr-try.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
export GUEST SCRATCH
python3 - <<'PYEOF'
import atexit, json, os, re, socket, subprocess, sys, time

GUEST, S = os.environ["GUEST"], os.environ["SCRATCH"]
SECTOR = 512
failures = []
vms = []
atexit.register(lambda: [vm.kill() for vm in vms])   # no QEMU left behind on an exception


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def record(n):
    t = b"vmreplica-demo seq=%d" % n
    return t + bytes(SECTOR - len(t))


def seq_of(data):
    m = re.fullmatch(rb"vmreplica-demo seq=(\d+)\x00*", data)
    return int(m.group(1)) if m else None


def disk(name, size, fmt="qcow2"):
    path = os.path.join(S, name)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
    return path


def sector(path, n, fmt="qcow2"):
    """sector n of a disk in use by QEMU (read-only, shared)."""
    out = subprocess.run(["qemu-io", "-U", "-r", "-f", fmt, "-c", f"read -v {n * SECTOR} {SECTOR}", path],
                         capture_output=True, text=True).stdout
    return bytes.fromhex("".join(l[10:58] for l in out.splitlines() if re.match(r"[0-9a-f]{8}:", l)))


def sector0(path, fmt="qcow2"):
    """seq in sector 0 of a disk in use by QEMU."""
    return seq_of(sector(path, 0, fmt))


def whole(path, fmt="qcow2"):
    raw = path + ".raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, raw], check=True)
    with open(raw, "rb") as f:
        data = f.read()
    os.unlink(raw)
    return data


def verify(path, first, fmt="qcow2", killed=False):
    """sectors first..N hold records with no gap, sector 0 holds N, after N zeros. -> N
    After a hard kill, sector N+1 may hold record N+1 already (killed between the two
    writes of a record); the next boot rewrites it with the same bytes."""
    data = whole(path, fmt)
    top = seq_of(data[:SECTOR])
    check(top is not None and top >= first, f"{os.path.basename(path)}: sector 0 holds seq={top}")
    if top is None:
        return None
    bad = [n for n in range(first, top + 1) if data[n * SECTOR:(n + 1) * SECTOR] != record(n)]
    check(not bad, f"{os.path.basename(path)}: sectors {first}..{top} hold exact records"
          + (f" (bad: {bad[:5]})" if bad else ""))
    if killed and data[(top + 1) * SECTOR:(top + 2) * SECTOR] == record(top + 1):
        print(f"     (sector {top + 1} already holds record {top + 1}: killed between the writes)")
        top += 1
    rest = data[(top + 1) * SECTOR:]
    check(rest.count(0) == len(rest), f"{os.path.basename(path)}: nothing written after sector {top}")
    return top


class VM:
    def __init__(self, name, disks, fmt="qcow2"):
        self.name, self.disks = name, disks
        self.log = os.path.join(S, name + ".console")
        self.qga = os.path.join(S, name + ".qga")
        self.qmp = os.path.join(S, name + ".qmp")
        args = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-nographic",
                "-display", "none", "-no-reboot",
                "-kernel", f"{GUEST}/vmlinuz", "-initrd", f"{GUEST}/initramfs.img",
                "-append", "console=ttyS0 quiet panic=-1", "-serial", f"file:{self.log}",
                "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=qga0,path={self.qga},server=on,wait=off",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        for i, d in enumerate(disks):
            args += ["-drive", f"file={d},if=none,id=d{i},format={fmt},cache=writeback",
                     "-device", f"virtio-blk-pci,drive=d{i}"]
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(args)
        vms.append(self)
        self.sock = None

    def console(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.console())
            if m:
                return m
            time.sleep(0.1)
        return None

    def agent(self, cmd, timeout=15, reply=True):
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(self.qga)
            self.buf = b""
        self.sock.settimeout(timeout)
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")
        if not reply:
            return None
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError("agent closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def qmp_cmd(self, cmd):
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.qmp)
        f = s.makefile("rwb")
        f.readline()
        for c in ({"execute": "qmp_capabilities"}, {"execute": cmd}):
            f.write(json.dumps(c).encode() + b"\n")
            f.flush()
            f.readline()
        s.close()

    def cpu_seconds(self):
        # per-thread schedstat (ns): tick-sampled utime/stime overstate a TCG guest that
        # wakes on timer ticks several times
        total = 0
        for t in os.listdir(f"/proc/{self.p.pid}/task"):
            try:
                with open(f"/proc/{self.p.pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
        return total / 1e9

    def wait_exit(self, timeout):
        try:
            self.p.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def seq_after(path, t, fmt="qcow2"):
    time.sleep(t)
    return sector0(path, fmt)


# --- 1. one disk: boot, first record, rate, agent ---------------------------------------
print("== one disk, first boot")
d1 = disk("one.qcow2", "64M")
vm = VM("one", [d1])
first = None
while time.monotonic() - vm.t0 < 90 and first is None:
    first = sector0(d1)
    if first is None:
        time.sleep(0.1)
t_first = time.monotonic() - vm.t0
check(first is not None, f"first record after {t_first:.1f} s from QEMU start (seq={first})")
check(vm.wait_console(r"writer on /dev/vda from seq=1\b") is not None, "console: writer on /dev/vda from seq=1")
time.sleep(2)
a, c0, t_a = sector0(d1), vm.cpu_seconds(), time.monotonic()
time.sleep(10)
b, c1, t_b = sector0(d1), vm.cpu_seconds(), time.monotonic()
rate = (b - a) / (t_b - t_a)
check(9.0 <= rate <= 10.5, f"rate {rate:.2f} records/s ({a} -> {b} in {t_b - t_a:.1f} s)")
print(f"     QEMU CPU while writing: {100 * (c1 - c0) / (t_b - t_a):.0f} % of a core")

check(vm.wait_console(r"agent on /dev/vport\d+p\d+") is not None, "console: agent started")
check(vm.agent({"execute": "guest-sync", "arguments": {"id": 12345}}) == b'{"return": 12345}', "guest-sync")
r = vm.agent({"execute": "guest-sync-delimited", "arguments": {"id": 77}})
check(r == b'\xff{"return": 77}', f"guest-sync-delimited -> {r!r}")
check(vm.agent({"execute": "guest-ping"}) == b'{"return": {}}', "guest-ping")
r = vm.agent({"execute": "guest-no-such"})
check(json.loads(r)["error"]["class"] == "CommandNotFound", f"unknown command -> {r!r}")
check(vm.agent({"execute": "guest-fsfreeze-status"}) == b'{"return": "thawed"}', "status thawed")
t = time.monotonic()
r = vm.agent({"execute": "guest-fsfreeze-freeze"})
check(r == b'{"return": 1}', f"freeze -> {r!r} in {time.monotonic() - t:.2f} s")
f1 = sector0(d1)
check(f1 is not None and sector(d1, f1) == record(f1) and sector(d1, f1 + 1) == bytes(SECTOR),
      f"frozen at a record boundary (sector 0 and sector {f1} hold record {f1}, sector {f1 + 1} empty)")
f2 = seq_after(d1, 2.5)
check(f1 == f2, f"no record while frozen (seq {f1} -> {f2} over 2.5 s)")
check(vm.agent({"execute": "guest-fsfreeze-status"}) == b'{"return": "frozen"}', "status frozen")
check(vm.agent({"execute": "guest-fsfreeze-thaw"}) == b'{"return": 1}', "thaw")
check(vm.agent({"execute": "guest-fsfreeze-status"}) == b'{"return": "thawed"}', "status thawed")
f3 = seq_after(d1, 1.5)
check(f3 is not None and f3 > f2, f"writer resumes after thaw ({f2} -> {f3})")
# auto-thaw
r = vm.agent({"execute": "guest-fsfreeze-freeze"})
t = time.monotonic()
g1 = sector0(d1)
while time.monotonic() - t < 14 and sector0(d1) == g1:
    time.sleep(0.2)
dt = time.monotonic() - t
check(9.5 <= dt <= 12, f"auto-thaw after {dt:.1f} s")
check(vm.agent({"execute": "guest-fsfreeze-status"}) == b'{"return": "thawed"}', "status thawed after auto-thaw")
check(vm.agent({"execute": "guest-fsfreeze-thaw"}) == b'{"return": 0}', "late thaw -> 0 (not frozen)")
c0, t0 = vm.cpu_seconds(), time.monotonic()
time.sleep(5)
print(f"     QEMU CPU (5 s): {100 * (vm.cpu_seconds() - c0) / (time.monotonic() - t0):.0f} % of a core")
# shutdown while frozen: must still stop cleanly
vm.agent({"execute": "guest-fsfreeze-freeze"})
vm.agent({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}, reply=False)
t = time.monotonic()
check(vm.wait_exit(20), f"guest-shutdown: QEMU exited after {time.monotonic() - t:.1f} s")
vm.kill()
n1 = verify(d1, 1)

# --- 2. boot again: continues from N+1; then a hard kill ----------------------------------
print("== one disk, second boot (continues), then kill -9")
vm = VM("one-again", [d1])
check(vm.wait_console(r"writer on /dev/vda from seq=%d\b" % (n1 + 1)) is not None,
      f"console: continues from seq={n1 + 1}")
time.sleep(5)
vm.kill()
n2 = verify(d1, 1, killed=True)
check(n2 is not None and n2 > n1, f"seq {n1} -> {n2} after second boot")

# --- 3. two disks: the writer picks vdb ------------------------------------------------
print("== two disks")
da, db = disk("a.qcow2", "32M"), disk("b.qcow2", "16M")
vm = VM("two", [da, db])
check(vm.wait_console(r"writer on /dev/vdb from seq=1\b") is not None, "console: writer on /dev/vdb")
time.sleep(4)
# --- 4. ACPI power button -------------------------------------------------------------
vm.qmp_cmd("system_powerdown")
t = time.monotonic()
check(vm.wait_exit(20), f"system_powerdown: QEMU exited after {time.monotonic() - t:.1f} s")
vm.kill()
check(re.search(r"writer stopped at seq=\d+", vm.console()) is not None, "console: writer stopped cleanly")
verify(db, 1)
check(whole(da).count(0) == 32 << 20, "vda untouched")

# --- 5. a full disk -------------------------------------------------------------------
print("== full disk")
dfull = disk("full.raw", "16K", "raw")               # 32 sectors: records 1..31
vm = VM("full", [dfull], "raw")
check(vm.wait_console(r"disk /dev/vda full, writer stops at seq=31") is not None, "console: disk full at 31")
r = vm.agent({"execute": "guest-fsfreeze-freeze"})
check(r == b'{"return": 1}', "freeze with a stopped writer")
vm.agent({"execute": "guest-shutdown"}, reply=False)
check(vm.wait_exit(20), "guest-shutdown: QEMU exited")
vm.kill()
check(verify(dfull, 1, "raw") == 31, "full disk holds records 1..31")

print("\nALL OK" if not failures else f"\n{len(failures)} FAILURE(S): {failures}")
sys.exit(1 if failures else 0)
PYEOF
