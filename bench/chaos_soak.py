"""Chaos: a randomized fault soak of a replicated running VM (issue 16).

Two real hosts on this machine (site-a primary, site-b replica, mutual TLS) and a VM
running the demo guest (a numbered record every 100 ms on its last disk), replicated every
30 s and by explicit `sync` calls, switched between periodic and continuous mode over the
run; the primary reaches the replica's replication port through a TCP proxy this script
controls. Faults are drawn at random (seeded: the seed is printed) at random moments —
often while a cycle runs:

  kill-replica / kill-primary   SIGKILL of a daemon, then `serve` again
  kill-qemu                     SIGKILL of the VM's QEMU, then `vm start` (tracking broken)
  kill-qsd                      SIGKILL of one qemu-storage-daemon of either home
  cut / stall                   the proxied connection cut (refused) or frozen for seconds
  tamper                        one byte flipped mid-stream in a cycle (periodic mode)
  fill                          the replica's storage (a tmpfs; root only) filled, then freed
  crash-state                   a power cut of the replica host mid-cycle (periodic mode):
                                its daemon and storage daemons SIGKILLed, then each head
                                rebuilt as the cut could have left it — the head as last
                                flushed plus a random half of the 4 KiB pages written
                                since (tests/crashstates.py, from the writes QEMU's
                                blklogwrites filter logged under qcow2)

After each fault the product must recover by itself, within a bounded time: periodic mode
back to `replicating` and a `sync --verify` that passes (the replica's head digests equal
the frozen point's), and every few faults the VM paused, synced and its disks compared
with the replica's heads by `qemu-img compare -U`; continuous mode back to `in_sync`, and
no record the guest saw acknowledged missing from the replica (the records on the primary
read first, then the replica's head: it must hold all of them but the one in flight).
`resync` is never called unless the product says the operator must (then the fault
counts as not recovered by itself). Every cycle the product ran (the primary's cycles
table, read-only) is counted: a full copy (an `initial`, or a cycle moving more than
--full-copy-mib) is a failure; the bytes moved to recover are reported per fault.

    python bench/chaos_soak.py [--faults 1000] [--seed S] [--minutes 600] [--work DIR]
                               [--compare-every 5] [--quick]

Bounded: every wait has a timeout, the run ends after --faults faults (or --minutes).
The last line is exactly:
`faults=N recovered=N mismatches=0 lost_acked=0 full_copies=0 median_recovery_s=X
max_recovery_s=Y` (exit status 1 unless recovered == faults and the others are 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vmreplica.hypervisor.guest import read_demo_records
from vmreplica.replica.heads import write_log_stem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the harness
import crashstates  # noqa: E402
from harness import lab  # noqa: E402

DISK0_FILL_MIB = 40                  # data on the first disk before protection
FULL_COPY_MIB = 32                   # a cycle moving more than this is a full copy
FAULTS = ("kill-replica", "kill-primary", "kill-qemu", "kill-qsd", "cut", "stall",
          "tamper", "fill", "crash-state")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the proxy -----------------------------------------------------------------------------
class ChaosProxy:
    """A TCP relay in front of the replica's replication port that can cut every
    connection (and refuse new ones) for a while, stall them (nothing forwarded either
    way), or flip one byte of the next upstream stream past a given offset."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(32)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self.refuse_until = 0.0
        self.stall_until = 0.0
        self.tamper_at: int | None = None        # upstream offset within one connection
        self.tampered = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="proxy").start()

    def cut(self, seconds: float) -> None:
        with self._lock:
            self.refuse_until = time.monotonic() + seconds
            conns, self._conns = self._conns, []
        for pair in conns:
            for s in pair:
                _close(s)

    def stall(self, seconds: float) -> None:
        self.stall_until = time.monotonic() + seconds

    def arm_tamper(self, offset: int) -> None:
        with self._lock:
            self.tamper_at = offset

    def disarm(self) -> None:
        with self._lock:
            self.tamper_at = None

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                _close(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.append((client, server))
            seen = [0]
            threading.Thread(target=self._pump, args=(client, server, seen, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, seen, False),
                             daemon=True).start()

    def _pump(self, src, dst, seen, upstream: bool):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while time.monotonic() < self.stall_until:   # bounded by the stall's end
                    time.sleep(0.05)
                if upstream:
                    with self._lock:
                        at = self.tamper_at
                        if at is not None and seen[0] + len(data) > at:
                            i = max(0, at - seen[0])
                            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
                            self.tamper_at = None
                            self.tampered += 1
                    seen[0] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            _close(s)
        with self._lock:
            self._conns = [p for p in self._conns if src not in p]

    def close(self):
        self._stop = True
        _close(self.listener)
        self.cut(0)


def _close(s) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# -- helpers -------------------------------------------------------------------------------
def wait_for(what: str, fn, timeout: float, every: float = 0.5):
    """Poll ``fn`` until it returns something true (returned), or None at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = fn()
        except Exception:  # noqa: BLE001 — a daemon being restarted, say: poll again
            v = None
        if v:
            return v
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


def alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False


def kill9(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def qsd_pids(*homes: Path) -> list[tuple[int, str]]:
    """qemu-storage-daemon processes whose command line names one of ``homes``."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-storage-daemon" not in cmd.split(b"\0")[0]:
            continue
        for h in homes:
            if str(h).encode() + b"/" in cmd:
                args = cmd.split(b"\0")
                pidfile = args[args.index(b"--pidfile") + 1] if b"--pidfile" in args else b"?"
                label = Path(pidfile.decode(errors="replace")).name.replace(".qsd.pid", "")
                out.append((int(p.name), f"{h.name}:{label}"))
                break
    return out


class Soak:
    def __init__(self, root: Path, rng: random.Random, faults: int, minutes: float,
                 compare_every: int, quick: bool, recover_timeout: float):
        self.root, self.rng, self.n_faults = root, rng, faults
        self.deadline = time.monotonic() + minutes * 60
        self.compare_every, self.quick = compare_every, quick
        self.recover_timeout = recover_timeout
        self.vm = "chaos"
        self.mode = "periodic"
        self.results: list[dict] = []
        self.mismatches, self.lost_acked, self.full_copies = 0, 0, 0
        self.problems: list[str] = []
        self.storage: Path | None = None
        self.a = self.b = self.proxy = None
        self.since_switch = 0
        self.layer_seen: dict[str, int] = {}
        self.only: set[str] = set()             # --kinds: only these faults
        # The demo guest writes a 512-byte record every 100 ms on its last disk and stops
        # when it is full: 32 MiB last 109 minutes of writing, 64 MiB 3 h 38 min (a
        # 1,000-fault run takes about 2 h; the first one ran 32 MiB full at fault 896).
        self.records_mib = 32 if faults <= 100 else 64
        self.aborted: str | None = None
        self.pause_max = 0.7 if quick else 2.0     # random waits around a fault

    # -- set-up ----------------------------------------------------------------------
    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            store = self.root / "store"
            store.mkdir(exist_ok=True)
            size = 320 + self.records_mib - 32         # MiB: disks, layers, stages
            p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}M,mode=0755",
                                "vmr-chaos", str(store)], capture_output=True, text=True)
            if p.returncode == 0:
                self.storage = store
        self.a = lab.LabHost(self.root / "a", "chaos-a").init().start()
        self.b = lab.LabHost(self.root / "b", "chaos-b").init().start()
        a, b, vm = self.a, self.b, self.vm
        self.proxy = ChaosProxy(b.port)
        token = b.run("trust", "token").stdout.strip().splitlines()[-1]
        a.run("trust", "pair", self.proxy.address, token)
        b.run("replica-server", "enable", "--allow", a.name,
              *(["--storage", str(self.storage)] if self.storage else []))
        a.run("vm", "create", vm, "--disk", "64M", "--disk", f"{self.records_mib}M",
              "--guest", "demo",
              "--share-rw")
        disks = a.vm(vm)["disks"]
        self.disk0 = disks[0]["name"]
        self.total_bytes = (64 + self.records_mib) << 20
        blob = self.root / "blob"
        blob.write_bytes(self.rng.randbytes(DISK0_FILL_MIB << 20))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -s {blob} 0 {DISK0_FILL_MIB}M", disks[0]["path"]],
                       check=True, capture_output=True)
        blob.unlink()
        self.blobs = []
        for i in range(4):
            f = self.root / f"blob{i}"
            f.write_bytes(self.rng.randbytes(4 << 20))
            self.blobs.append(f)
        a.run("vm", "start", vm)
        if not wait_for("records", lambda: (self.records_a()["top"] or 0) >= 3, 120):
            raise RuntimeError("the demo guest wrote no record in 120 s")
        a.run("enable", vm, "--replica", self.proxy.address, "--frequency", "30s")
        t = time.monotonic()
        a.run("initial", vm)
        st = a.json("sync", vm, "--verify")
        assert st.get("verified"), st
        self.setup_cycle_id = self.last_cycle_id()
        log(f"set up: initial copy and a verified cycle in {time.monotonic() - t:.1f} s; "
            f"replica storage {'tmpfs ' + str(self.storage) if self.storage else 'home'}")

    def teardown(self) -> None:
        if self.proxy:
            self.proxy.close()
        hosts = [h for h in (self.a, self.b) if h]
        try:
            lab.teardown(*hosts)
        except Exception as e:  # noqa: BLE001
            log(f"teardown: {e}")
        if self.storage:
            subprocess.run(["umount", "-l", str(self.storage)], capture_output=True)

    # -- reading the state -----------------------------------------------------------
    def records_a(self) -> dict:
        return read_demo_records(self.a.vm(self.vm)["disks"][-1]["path"])

    def head_paths(self) -> dict:
        return {d["name"]: d["path"] for d in self.b.vm(self.vm)["disks"]}

    def status(self, host=None) -> dict:
        return (host or self.a).json("status", self.vm, timeout=30)[0]

    def db_rows(self, sql: str, args=()) -> list:
        db = sqlite3.connect(f"file:{self.a.home / 'state.db'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def last_cycle_id(self) -> int:
        return self.db_rows("SELECT coalesce(max(id), 0) FROM cycles")[0][0]

    def cycles_since(self, cid: int) -> list[tuple]:
        return self.db_rows("SELECT id, kind, ok, raw_bytes, wire_bytes FROM cycles "
                            "WHERE vm=? AND id>? ORDER BY id", (self.vm, cid))

    def events_tail(self, n: int = 10) -> str:
        out = []
        for h in (self.a, self.b):
            try:
                for e in h.json("events", self.vm, timeout=30)[-n:]:
                    out.append(f"    {h.name} {e['kind']}: {e['message'][:220]}")
            except Exception as e:  # noqa: BLE001
                out.append(f"    {h.name}: events unavailable ({e})")
        return "\n".join(out)

    def layer_use(self) -> dict[str, int]:
        """Bytes allocated by each replica layer file (st_blocks), by disk/layer."""
        out = {}
        for name, path in self.head_paths().items():
            for f in sorted(Path(path).parent.glob("layer-*.qcow2")):
                try:
                    out[f"{name}/{f.stem[-2:]}"] = f.stat().st_blocks * 512
                except OSError:
                    pass
        return out

    def write_some(self, mib: int | None = None) -> None:
        """Changes on the first disk through the VM's own device (so a cycle has data)."""
        mib = mib or self.rng.randint(1, 4)
        off = self.rng.randrange(0, (64 - mib) * 16) * 64      # KiB, 64 KiB aligned
        blob = self.blobs[self.rng.randrange(len(self.blobs))]  # incompressible
        self.a.run("vm", "io", self.vm, self.disk0, f"write -s {blob} {off}K {mib}M",
                   timeout=60, check=False)

    def ensure_daemons(self) -> None:
        for h in (self.a, self.b):
            if not alive(h.daemon_pid()):
                h.start()

    # -- faults ----------------------------------------------------------------------
    def background_sync(self):
        return subprocess.Popen(lab.cli_path() + ["--home", str(self.a.home), "sync", self.vm],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def draw(self) -> str:
        kinds = ["kill-replica", "kill-primary", "kill-qemu", "kill-qsd", "cut", "stall"]
        # (--quick: fewer of the slow ones, a VM restart and a killed mirror target)
        slow_qsd = self.quick and self.mode == "continuous"
        weights = [3, 3, 1 if self.quick else 2, 1 if slow_qsd else 3, 3, 3]
        if self.mode == "periodic":
            kinds.append("tamper")
            weights.append(3)
            kinds.append("crash-state")
            weights.append(2)
        if self.storage:
            kinds.append("fill")
            weights.append(1 if self.quick else 2)
        if self.only:
            pairs = [(k, w) for k, w in zip(kinds, weights, strict=True) if k in self.only]
            if not pairs:                       # none of them in this mode: switch
                return "switch"
            kinds, weights = [k for k, _ in pairs], [w for _, w in pairs]
        return self.rng.choices(kinds, weights)[0]

    def inject(self, kind: str) -> dict:
        """Do the fault (and the operator's restart); returns what it did."""
        a, b, rng, vm = self.a, self.b, self.rng, self.vm
        info: dict = {}
        sync = None
        if kind == "crash-state":
            return self.crash_state()
        if self.mode == "periodic" and rng.random() < 0.6 and kind != "kill-qemu":
            self.write_some()
            sync = self.background_sync()       # the fault lands (often) mid-cycle
            time.sleep(rng.uniform(0.05, 1.2))
        else:
            time.sleep(rng.uniform(0.0, self.pause_max))
        try:
            if kind in ("kill-replica", "kill-primary"):
                h = b if kind == "kill-replica" else a
                pid = h.daemon_pid()
                kill9(pid)
                wait_for("daemon gone", lambda: not alive(pid), 10, 0.05)
                time.sleep(rng.uniform(0.0, self.pause_max))
                h.start()
            elif kind == "kill-qemu":
                if self.mode == "continuous":
                    info["acked"] = None
                pid = a.vm(vm)["pid"]
                kill9(pid)
                wait_for("qemu gone", lambda: not alive(pid), 10, 0.05)
                if self.mode == "continuous":
                    # What the guest saw acknowledged is on the primary's disk now; the
                    # replica must hold it all (but the one write in flight).
                    on_a = self.records_a()
                    on_b = read_demo_records(self.head_paths()[a.vm(vm)["disks"][-1]["name"]])
                    info["acked"] = (on_a["contiguous"], on_b["contiguous"], on_b["gap_at"])
                    if on_b["gap_at"] is not None or on_b["contiguous"] < on_a["contiguous"] - 1:
                        self.lost_acked += max(1, on_a["contiguous"] - 1 - on_b["contiguous"])
                        self.problems.append(f"lost acked records at kill-qemu: a={on_a} b={on_b}")
                time.sleep(rng.uniform(0.0, 1.0))
                a.run("vm", "start", vm, timeout=120)
            elif kind == "kill-qsd":
                pids = qsd_pids(a.home, b.home)
                if not pids and self.mode == "periodic":
                    if sync is None:
                        self.write_some()
                        sync = self.background_sync()
                    pids = wait_for("a storage daemon", lambda: qsd_pids(a.home, b.home), 5, 0.02)
                if not pids:
                    info["skipped"] = "no storage daemon ran"
                else:
                    pid, where = rng.choice(pids)
                    info["qsd"] = where
                    kill9(pid)
            elif kind == "cut":
                secs = rng.uniform(1, 3 if self.quick else 6)
                info["seconds"] = round(secs, 1)
                self.proxy.cut(secs)
                time.sleep(secs)
            elif kind == "stall":
                secs = rng.uniform(1, 3 if self.quick else 8)
                info["seconds"] = round(secs, 1)
                self.proxy.stall(secs)
                time.sleep(secs)
            elif kind == "tamper":
                if sync is not None:            # let that cycle end first: tamper the next
                    sync.wait(timeout=120)
                    sync = None
                self.write_some(rng.randint(2, 4))
                was = self.proxy.tampered
                self.proxy.arm_tamper(rng.randrange(16 << 10, 1 << 20))
                p = a.run("sync", vm, check=False, timeout=120)
                self.proxy.disarm()
                info["tampered"] = self.proxy.tampered - was
                info["sync_exit"] = p.returncode
                if info["tampered"] and p.returncode == 0:
                    self.problems.append(f"a tampered cycle was acknowledged: {p.stdout[:200]}")
            elif kind == "fill":
                info.update(self.fill_and_free())
        finally:
            if sync is not None:
                self.end_sync(sync, "a fault")
        return info

    def end_sync(self, sync, after: str) -> None:
        """Wait for a background `sync` (bounded: a problem if it outlives 180 s)."""
        try:
            sync.wait(timeout=180)
        except subprocess.TimeoutExpired:
            sync.kill()
            sync.wait(timeout=10)
            self.problems.append(f"a sync did not end within 180 s of {after}")

    def crash_state(self) -> dict:
        """A power cut of the replica host while a cycle runs, its heads as the cut could
        have left them. The replica daemon is stopped cleanly first (its heads closed and
        flushed: the state the rebuild starts from), started again with every head
        opening's writes logged, then killed at a random moment of a cycle with its
        storage daemons; each head is rebuilt from that start and the log: every write
        up to the last flush that reached the disk, then each 4 KiB page written since
        as it was or as one of its later versions, at random (crashstates.CrashStates,
        the harness's model of the page cache). Other files are as the kill left them
        (their own syncs are the crash-state harness's subject)."""
        b, rng = self.b, self.rng
        heads = self.head_paths()
        logs = self.root / "wlog"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir()
        b.stop()
        wait_for("replica stopped", lambda: not alive(b.daemon_pid()) and not qsd_pids(b.home),
                 60, 0.1)
        synced = {name: Path(p).read_bytes() for name, p in heads.items()}
        os.environ["VMREPLICA_HEAD_WRITE_LOG"] = str(logs)
        try:
            b.start()
        finally:
            del os.environ["VMREPLICA_HEAD_WRITE_LOG"]
        mib = rng.randint(2, 4)
        self.write_some(mib)
        sync = self.background_sync()
        # The cut lands while the cycle's writes reach the heads (most of the time):
        # once the logs hold a random part of them, or after 5 s.
        part = rng.uniform(0.0, 1.1) * (mib << 20)
        wait_for("writes", lambda: sum(f.stat().st_size for f in logs.glob("*.log"))
                 >= part, 5, 0.002)
        pids = [b.daemon_pid()] + [pid for pid, _ in qsd_pids(b.home)]
        for pid in pids:                            # the power cut: all at once
            if pid:
                kill9(pid)
        for pid in pids:
            if pid:
                wait_for("killed", lambda: not alive(pid), 10, 0.05)  # noqa: B023
        for pid, _ in qsd_pids(b.home):             # one started in between
            kill9(pid)
        info: dict = {"logged": 0, "dirty_pages": 0, "written_back": 0}
        for name, path in heads.items():
            entries = []
            for log_file in sorted(logs.glob(f"{write_log_stem(path)}.*.log"),
                                   key=lambda f: int(f.name.split(".")[-2])):
                entries += crashstates.parse_log(log_file)
            if not entries:
                continue
            chose = crashstates.CrashStates(synced[name], entries).build(
                len(entries), rng, path)
            info["logged"] += len(entries)
            info["dirty_pages"] += chose["dirty_pages"]
            info["written_back"] += chose["written_back"]
        shutil.rmtree(logs, ignore_errors=True)
        self.end_sync(sync, "a crash state")
        b.start()
        return info

    def fill_and_free(self) -> dict:
        filler = self.storage / "filler"
        chunk = b"\xff" * (4 << 20)
        with open(filler, "wb") as f:
            for _ in range(200):              # bounded: 800 MiB > the tmpfs
                try:
                    f.write(chunk)
                    f.flush()
                except OSError:
                    break
        self.write_some(4)
        said = None
        if self.mode == "periodic":
            p = self.a.run("sync", self.vm, check=False, timeout=120)
            said = p.stderr.strip().splitlines()[-2:] if p.returncode else ["(the sync passed)"]
        else:
            said = wait_for("degraded", lambda: self.status()["sync_state"] == "degraded"
                            and [self.status()["sync_reason"]], 20)
        time.sleep(self.rng.uniform(0, 2))
        filler.unlink()                          # the one manual step
        return {"said": " / ".join(said or ["nothing"])[:200]}

    # -- recovery --------------------------------------------------------------------
    def operator_needed(self, st: dict) -> str | None:
        text = " ".join([st.get("next") or ""] + list(st.get("reasons") or []))
        if st.get("state") == "resync_required" and ("window" in text or "operator" in text):
            return text
        if st.get("state") == "error":
            return text
        return None

    def recover_periodic(self, t0: float, deadline: float) -> tuple[bool, str]:
        a, vm = self.a, self.vm
        last_err = ""
        stuck_since = None
        while time.monotonic() < deadline:
            try:
                st = self.status()
            except Exception as e:  # noqa: BLE001
                last_err = f"status: {e}"
                time.sleep(0.5)
                continue
            if st["state"] != "replicating":
                need = self.operator_needed(st)
                if need:
                    stuck_since = stuck_since or time.monotonic()
                    if time.monotonic() - stuck_since > 45:
                        return False, f"the operator must act: {st['state']}: {need}"
                last_err = f"state {st['state']} ({'; '.join(st.get('reasons') or [])})"
                time.sleep(0.5)
                continue
            p = a.run("sync", vm, "--verify", "--json", check=False, timeout=180)
            if p.returncode == 0:
                out = json.loads(p.stdout)
                if out.get("verified"):
                    return True, ""
                last_err = f"sync not verified: {p.stdout[:200]}"
            else:
                last_err = p.stderr.strip()[-300:]
                if "verification failed" in p.stderr:
                    self.mismatches += 1
                    self.problems.append(f"sync --verify found a mismatch: {last_err}")
                    return False, last_err
            time.sleep(1)
        return False, f"timed out: {last_err}"

    def recover_continuous(self, t0: float, deadline: float) -> tuple[bool, str]:
        last = ""
        while time.monotonic() < deadline:
            try:
                st = self.status()
            except Exception as e:  # noqa: BLE001
                last = f"status: {e}"
                time.sleep(0.5)
                continue
            if st["state"] == "replicating" and st["sync_state"] == "in_sync":
                return True, ""
            need = self.operator_needed(st)
            last = (f"state {st['state']} {st['sync_state']} ({st.get('sync_reason')}; "
                    f"{'; '.join(st.get('reasons') or [])})")
            if need and time.monotonic() - t0 > 60:
                return False, f"the operator must act: {last}"
            time.sleep(0.5)
        return False, f"timed out: {last}"

    def check_acked(self, deadline: float) -> tuple[bool, str]:
        """In sync: every record on the primary's disk (read first) is on the replica's
        head (read next), but the one write in flight. A miss counts as a lost
        acknowledged record unless the product says, within 3 s, that the mirror had
        left in_sync meanwhile (it then was not the zero-loss mode: recover again)."""
        name = self.a.vm(self.vm)["disks"][-1]["name"]
        while True:
            t = time.time()
            on_a = self.records_a()
            on_b = read_demo_records(self.head_paths()[name])
            if on_b["gap_at"] is None and on_b["contiguous"] >= on_a["contiguous"] - 1:
                return True, ""
            time.sleep(3)
            left = [e for e in self.a.json("events", self.vm, "--since", "2m", timeout=30)
                    if e["ts"] >= t - 1 and e["kind"] == "continuous"
                    and not e["message"].startswith("in_sync")]
            if not left:
                self.lost_acked += max(1, on_a["contiguous"] - 1 - on_b["contiguous"])
                self.problems.append(f"acked records missing on the replica while in_sync: "
                                     f"a={on_a} b={on_b}")
                return True, ""              # (recovered; the loss is counted apart)
            ok, why = self.recover_continuous(time.monotonic(), deadline)
            if not ok:
                return ok, why

    def compare_paused(self) -> None:
        """Independent of the product's own verify: pause the guest, one cycle, compare
        every disk with the replica's head (guest-visible contents), resume."""
        from vmreplica.hypervisor.qemu import QemuDriver
        drv = QemuDriver(self.a.home, {})
        with drv.monitor(self.vm, timeout=10) as m:
            m.execute("stop")
        try:
            p = self.a.run("sync", self.vm, check=False, timeout=180)
            if p.returncode != 0:
                self.problems.append(f"paused compare: the sync failed: {p.stderr[-200:]}")
                return
            heads = self.head_paths()
            equal = 0
            for d in self.a.vm(self.vm)["disks"]:
                c = subprocess.run(["qemu-img", "compare", "-U", d["path"], heads[d["name"]]],
                                   capture_output=True, text=True, timeout=120)
                if c.returncode != 0:
                    self.mismatches += 1
                    self.problems.append(f"{d['name']} differs from the replica's head: "
                                         f"{(c.stdout + c.stderr).strip()[:300]}")
                    log(f"paused compare: {self.problems[-1]}")
                else:
                    equal += 1
            log(f"paused compare: {equal} of {len(heads)} disks equal to the replica's heads")
        finally:
            with drv.monitor(self.vm, timeout=10) as m:
                m.execute("cont")

    def count_copies(self, before: int) -> tuple[int, int]:
        moved, full = 0, 0
        for cid, kind, _ok, raw, _wire in self.cycles_since(before):
            moved += int(raw or 0)
            if kind == "initial" or int(raw or 0) > FULL_COPY_MIB << 20:
                full += 1
                self.problems.append(f"cycle {cid} ({kind}) moved {raw} bytes: a full copy")
                log(self.problems[-1])
        return moved, full

    def switch_mode(self) -> float:
        new = "continuous" if self.mode == "periodic" else "periodic"
        t = time.monotonic()
        extra = ["--max-stall", "5"] if new == "continuous" else []
        self.a.run("set", self.vm, "--mode", new, *extra, timeout=180)
        self.mode = new
        self.since_switch = 0
        deadline = t + self.recover_timeout
        ok, why = (self.recover_continuous(t, deadline) if new == "continuous"
                   else self.recover_periodic(t, deadline))
        if not ok:
            raise RuntimeError(f"switching to {new} did not settle: {why}\n{self.events_tail()}")
        log(f"mode -> {new} in {time.monotonic() - t:.1f} s")
        return time.monotonic() - t

    # -- the run ---------------------------------------------------------------------
    def run(self) -> int:
        n = 0
        while n < self.n_faults and time.monotonic() < self.deadline:
            if self.since_switch >= 6 or (n > 0 and self.rng.random() < 0.2):
                self.switch_mode()
            kind = self.draw()
            if kind == "switch":
                self.switch_mode()
                continue
            mode = self.mode
            before = self.last_cycle_id()
            top_before = self.records_a()["contiguous"] if mode == "continuous" else 0
            t_fault = time.monotonic()
            info = self.inject(kind)
            if info.get("skipped"):
                log(f"fault {kind} skipped: {info['skipped']}")
                continue
            n += 1
            self.since_switch += 1
            t0 = time.monotonic()                # the fault is over: the product's turn
            deadline = t0 + self.recover_timeout
            if mode == "continuous" and kind in ("kill-qsd", "kill-replica", "kill-qemu",
                                                 "fill"):
                # A mirror's target gone must be noticed (degraded) before in_sync counts.
                info["noticed"] = bool(wait_for(
                    "degraded", lambda: self.status()["sync_state"] != "in_sync", 8, 0.2))
            ok, why = (self.recover_continuous(t0, deadline) if mode == "continuous"
                       else self.recover_periodic(t0, deadline))
            if ok and mode == "continuous":
                # The guest writes again (a restarted QEMU: booted) before the check, so
                # that new records must have reached the replica through the mirror.
                if not wait_for("new records", lambda: self.records_a()["contiguous"]
                                >= top_before + 5,  # noqa: B023 — polled before the loop goes on
                                max(1.0, deadline - time.monotonic())):
                    ok, why = False, "the guest wrote no new record"
                else:
                    ok, why = self.check_acked(deadline)
            rec_s = time.monotonic() - t0
            moved, full = self.count_copies(before)
            self.full_copies += full
            r = {"n": n, "kind": kind, "mode": mode, "recovered": ok, "recovery_s": rec_s,
                 "fault_s": t0 - t_fault, "moved": moved, **info}
            self.results.append(r)
            use = self.layer_use()
            grown = {k: v for k, v in use.items() if v - self.layer_seen.get(k, 0) >= 1 << 20}
            self.layer_seen = use
            big = {k: v for k, v in use.items() if v > self.total_bytes}
            if big:         # more than the VM's disks hold together: space lost
                self.problems.append(f"after fault {n} a replica layer holds more than the "
                                     f"VM's disks: {big}")
            log(f"fault {n:3d} {kind:12s} {mode:10s} "
                f"{'recovered' if ok else 'NOT RECOVERED'} in {rec_s:5.1f} s "
                f"(fault {t0 - t_fault:4.1f} s), moved {moved / 2**20:6.2f} MiB"
                + "".join(f" {k}={v}" for k, v in info.items())
                + (" layers_grew=" + ",".join(f"{k}:{v / 2**20:.1f}MiB" for k, v in
                                              grown.items()) if grown else ""))
            if not ok and self.records_a()["top"] >= (self.records_mib << 11) - 1:
                self.aborted = (f"the demo guest's record disk ({self.records_mib} MiB) is "
                                f"full: no new record can be checked (a limit of this "
                                f"soak, not a fault of the product)")
                log(self.aborted)
                self.results.pop()
                n -= 1
                break
            if not ok:
                self.problems.append(f"fault {n} ({kind}, {mode}) not recovered: {why}")
                log(f"  why: {why}\n{self.events_tail()}")
                if not self.operator_rescue():
                    log("the product could not be brought back: the run stops here")
                    break
                continue
            if mode == "periodic" and self.compare_every and n % self.compare_every == 0:
                self.compare_paused()
        return n

    def operator_rescue(self) -> bool:
        """After a failure to recover: what an operator would do (counted as a failure
        already), so the run can go on with the next fault."""
        self.ensure_daemons()
        try:
            if self.a.vm(self.vm).get("state") != "running":
                self.a.run("vm", "start", self.vm, timeout=120, check=False)
            st = self.status()
            if st["state"] in ("resync_required", "error"):
                self.a.run("resync", self.vm, "--now", timeout=300, check=False)
        except Exception as e:  # noqa: BLE001
            log(f"rescue: {e}")
        t = time.monotonic()
        ok, _why = (self.recover_continuous(t, t + 180) if self.mode == "continuous"
                    else self.recover_periodic(t, t + 180))
        return ok

    def daemon_warnings(self) -> list[str]:
        out = []
        for h in (self.a, self.b):
            try:
                text = (h.home / "daemon.log").read_text(errors="replace")
            except OSError:
                continue
            out += [f"{h.name}: {line[:240]}" for line in text.splitlines()
                    if " ERROR " in line or "Traceback" in line]
        return out


def figures_line(soak: Soak, faults: int) -> str:
    times = [r["recovery_s"] for r in soak.results if r["recovered"]]
    recovered = sum(1 for r in soak.results if r["recovered"])
    med = statistics.median(times) if times else 0.0
    mx = max(times) if times else 0.0
    return (f"faults={faults} recovered={recovered} mismatches={soak.mismatches} "
            f"lost_acked={soak.lost_acked} full_copies={soak.full_copies} "
            f"median_recovery_s={med:.1f} max_recovery_s={mx:.1f}")


def summary(soak: Soak) -> list[str]:
    lines = []
    kinds = sorted({(r["kind"], r["mode"]) for r in soak.results})
    for k, m in kinds:
        rs = [r for r in soak.results if r["kind"] == k and r["mode"] == m]
        rec = [r["recovery_s"] for r in rs if r["recovered"]]
        lines.append(f"  {k:12s} {m:10s} n={len(rs):3d} recovered={len(rec):3d} "
                     f"median_s={statistics.median(rec) if rec else 0:5.1f} "
                     f"max_s={max(rec) if rec else 0:5.1f} "
                     f"max_moved_MiB={max(r['moved'] for r in rs) / 2**20:6.2f}")
    return lines


def run(faults: int, seed: int | None = None, minutes: float = 600, work: str | None = None,
        compare_every: int = 5, quick: bool = False, recover_timeout: float = 180,
        keep: bool = False, kinds: set[str] | None = None) -> tuple[str, Soak]:
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 32)
    root = Path(work or tempfile.mkdtemp(prefix="vmr-soak-", dir="/tmp")).absolute()
    log(f"seed={seed} work={root} faults={faults}")
    soak = Soak(root, random.Random(seed), faults, minutes, compare_every, quick,
                recover_timeout)
    soak.only = set(kinds or ())
    start = time.monotonic()
    n = 0
    try:
        soak.setup()
        n = soak.run()
    except Exception as e:  # noqa: BLE001 — reported with the figures, exit status 1
        n = len(soak.results)
        soak.aborted = f"{type(e).__name__}: {e}"
        soak.problems.append(f"the run stopped: {soak.aborted}")
    finally:
        warnings = soak.daemon_warnings() if soak.a else []
        soak.teardown()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    for line in summary(soak):
        print(line)
    for p in soak.problems:
        print("problem:", p)
    for w in warnings[:15]:
        print("daemon:", w)
    print(f"seed={seed} wall_s={time.monotonic() - start:.0f}")
    line = figures_line(soak, n)
    print(line, flush=True)
    return line, soak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=600.0, help="stop after this long")
    ap.add_argument("--work", default=None, help="(default: a new directory under /tmp)")
    ap.add_argument("--compare-every", type=int, default=5,
                    help="pause, sync and qemu-img compare every Nth periodic fault (0: never)")
    ap.add_argument("--quick", action="store_true", help="shorter cuts and stalls")
    ap.add_argument("--recover-timeout", type=float, default=180.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--kinds", default="", help=f"only these faults (comma-separated: "
                    f"{', '.join(FAULTS)}); default all")
    args = ap.parse_args()
    unknown = {k for k in args.kinds.split(",") if k} - set(FAULTS)
    if unknown:
        ap.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    _line, soak = run(args.faults, args.seed, args.minutes, args.work, args.compare_every,
                      args.quick, args.recover_timeout, args.keep,
                      {k for k in args.kinds.split(",") if k})
    ok = (soak.mismatches == soak.lost_acked == soak.full_copies == 0
          and not soak.aborted and not soak.problems and soak.results
          and all(r["recovered"] for r in soak.results) and len(soak.results) == args.faults)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
