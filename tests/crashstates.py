"""Crash states of a replica head: what a power cut can leave of the writes qcow2 made.

Two parts, used by tests/integration/test_crash_states.py (short run) and
bench/chaos_crash_states.py (long run):

* ``parse_log`` reads a dm-log-writes log as QEMU's ``blklogwrites`` filter writes it
  (the head servers insert it under the qcow2 node when ``VMREPLICA_HEAD_WRITE_LOG`` is
  set, see qemutools.qsd.qcow2_node). Format (block/blklogwrites.c, Linux
  dm-log-writes), all little-endian: sector 0 holds the super block (magic
  0x6a736677736872, version 1, nr_entries, sectorsize) — QEMU rewrites it only on a
  flush, so without flushes it stays zero and the entries are read until the first
  empty or invalid one; from sector 1 each entry is one sector of header (sector,
  nr_sectors, flags, data_len) followed, unless it is a discard, by nr_sectors sectors
  of data (a zero write logs its zeroes). ``sector`` counts log sectors (512 bytes here).
* ``CrashStates`` builds the file a power cut at log position ``i`` can leave: the file
  as last synced, every write up to the last FLUSH before ``i`` applied in order, then
  each 4 KiB page dirtied after that flush (up to ``i``) either as it was at the flush
  or as any one of the versions written to it since (page-cache writeback writes any
  subset of dirty pages, in any order, at any time). ``i == len(entries)`` is a crash
  during the checkpoint's fdatasync, after the last write.

And the scenario (``Scenario``): real daemons (vmreplica.lab), a 1.5 GiB disk, and the
check of each state through the real start-up recovery (receiver.recover).

Limits of the model: the file's size is taken as durable (the preallocate filter
extends it with fallocate, the file system journals that); a write logged before a
FLUSH is taken as covered by it (QEMU logs a write once it completed, so this is true
for every write qcow2 waited for, which are the ones its ordering relies on).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = 0x6a736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
FLAG_MASK = FLUSH | FUA | DISCARD | MARK
PAGE = 4096


@dataclass
class Entry:
    offset: int          # bytes, in the logged file
    length: int          # bytes
    flags: int
    data: bytes | None   # None for a discard, a flush or a mark

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_write(self) -> bool:
        return self.length > 0 and not self.flags & MARK


def parse_log(path: str | Path, limit: int | None = None) -> list[Entry]:
    """The entries of a dm-log-writes log (its first ``limit`` bytes when given)."""
    with open(path, "rb") as f:
        buf = f.read() if limit is None else f.read(limit)
    sector = 512
    if len(buf) >= 28:
        magic, version, _n, ss = struct.unpack_from("<QQQI", buf, 0)
        if magic == MAGIC:
            if version != 1:
                raise ValueError(f"{path}: dm-log-writes version {version}")
            sector = ss
        elif magic != 0:
            raise ValueError(f"{path}: not a dm-log-writes log (magic {magic:#x})")
    entries, pos = [], sector
    while pos + 32 <= len(buf):
        sec, nr, flags, data_len = struct.unpack_from("<QQQQ", buf, pos)
        if flags & ~FLAG_MASK or (nr == 0 and not flags & (FLUSH | MARK)):
            break                                   # past the last entry written
        pos += sector
        if flags & MARK:
            pos += -(-data_len // sector) * sector
            entries.append(Entry(0, 0, flags, None))
            continue
        if flags & DISCARD or flags & FLUSH and nr == 0:
            entries.append(Entry(sec * sector, nr * sector, flags, None))
            continue
        end = pos + nr * sector
        if end > len(buf):
            break                                   # a torn last entry
        entries.append(Entry(sec * sector, nr * sector, flags, buf[pos:end]))
        pos = end
    return entries


def _apply(img: bytearray, e: Entry) -> None:
    end = e.offset + e.length
    if end > len(img):
        img.extend(bytes(end - len(img)))
    img[e.offset:end] = e.data if e.data is not None else bytes(e.length)


class CrashStates:
    """States a power cut can leave of a file last synced as ``synced`` (bytes) on which
    ``entries`` were then written. Build them in increasing ``i`` (cheapest)."""

    def __init__(self, synced: bytes, entries: list[Entry]):
        self.entries = entries
        self.synced = synced
        self._durable = bytearray(synced)   # synced + writes up to self._upto (a flush)
        self._upto = 0
        self.flush_positions = [k for k, e in enumerate(entries) if e.is_flush]

    def last_flush_before(self, i: int) -> int:
        """Index just past the last FLUSH among entries[:i] (0: none)."""
        last = 0
        for k in self.flush_positions:
            if k < i:
                last = k + 1
            else:
                break
        return last

    def build(self, i: int, rng: random.Random, out: str | Path) -> dict:
        """Write to ``out`` a state of a crash after entries[:i]; what it chose."""
        f = self.last_flush_before(i)
        if f < self._upto:                          # going back: start over
            self._durable, self._upto = bytearray(self.synced), 0
        for e in self.entries[self._upto:f]:
            if e.is_write:
                _apply(self._durable, e)
        self._upto = f
        size = len(self._durable)
        versions: dict[int, list[bytes]] = {}      # page -> contents written since f
        for e in self.entries[f:i]:
            if not e.is_write:
                continue
            size = max(size, e.offset + e.length)
            first, last = e.offset // PAGE, (e.offset + e.length - 1) // PAGE
            for p in range(first, last + 1):
                seen = versions.get(p)
                page = bytearray(seen[-1] if seen else self._page(p))
                lo, hi = max(e.offset, p * PAGE), min(e.offset + e.length, (p + 1) * PAGE)
                page[lo - p * PAGE:hi - p * PAGE] = (
                    e.data[lo - e.offset:hi - e.offset] if e.data is not None
                    else bytes(hi - lo))
                versions.setdefault(p, []).append(bytes(page))
        written = stale = 0
        with open(out, "wb") as fh:
            fh.write(self._durable)
            if size > len(self._durable):
                fh.truncate(size)
            for p in sorted(versions):
                if rng.random() < 0.5:
                    stale += 1                      # never written back
                    continue
                written += 1
                fh.seek(p * PAGE)
                fh.write(rng.choice(versions[p]))
            if fh.tell() > size:
                size = fh.tell()
        os.truncate(out, max(size, len(self._durable)))
        return {"i": i, "after_flush": f, "dirty_pages": len(versions),
                "written_back": written, "left_stale": stale}

    def _page(self, p: int) -> bytes:
        page = bytes(self._durable[p * PAGE:(p + 1) * PAGE])
        return page + bytes(PAGE - len(page))


# -- qcow2 facts, to check the scenario exercises what it means to ---------------------

def l2_table_offset(path: str | Path, guest_offset: int) -> int:
    """Where the L2 table that maps ``guest_offset`` lives in a qcow2 file (0: none)."""
    with open(path, "rb") as f:
        hdr = f.read(48)
        cluster_bits = struct.unpack_from(">I", hdr, 20)[0]
        l1_size, l1_offset = struct.unpack_from(">IQ", hdr, 36)
        per_l2 = (1 << cluster_bits) // 8 << cluster_bits
        idx = guest_offset // per_l2
        if idx >= l1_size:
            return 0
        f.seek(l1_offset + 8 * idx)
        return struct.unpack(">Q", f.read(8))[0] & 0x00ff_ffff_ffff_fe00


# -- the scenario, through real daemons ---------------------------------------------------

MiB = 1 << 20
REGION_A = 0            # written, then trimmed: its clusters are freed, their bytes stay
REGION_B = 512 * MiB    # first written by the cycle under test: a new L2 table
# The cycle under test: (offset, length, pattern) — a new L2 table's worth of region B,
# and region A again (clusters reused).
CYCLE = [(REGION_B + 8 * MiB, 2 * MiB, 0x5b), (REGION_B + 300 * MiB, 256 << 10, 0x5d),
         (REGION_A + 4 * MiB, 1 * MiB, 0x5c)]


def _qemu_io(path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run(args + [str(path)], capture_output=True, text=True)
    if proc.returncode != 0 or "error" in proc.stdout.lower():
        raise RuntimeError(proc.stdout + proc.stderr)


def _wait(what: str, fn, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@dataclass
class Scenario:
    """What the cycle under test left, copied out at the kill."""
    work: Path
    replica_home: Path
    vm: str
    head: Path                 # the replica's head (where each state is written)
    synced: Path               # the head as last synced, before the cycle
    log: Path                  # the head's write log, cut at the ack
    expected: Path             # the primary's disk after the cycle
    previous: Path             # ... and before it
    db: Path                   # state.db* at the kill
    stage: Path                # staging/<vm> at the kill
    extents: list = field(default_factory=lambda: [(o, n) for o, n, _ in CYCLE])
    l2_on_stale_bytes: bool = False
    log_entries: int = 0
    flushes: int = 0


def random_cycle(rng: random.Random) -> list[tuple[int, int, int]]:
    """A cycle like ``CYCLE`` at random places: 1-3 extents in region B (its new L2
    table), 1-2 in region A's trimmed part (freed clusters reused); 64 KiB aligned."""
    out = []
    for _ in range(rng.randint(1, 3)):
        out.append((REGION_B + rng.randrange(0, 500) * MiB + rng.randrange(16) * 65536,
                    rng.choice([64 << 10, 256 << 10, 1 * MiB, 3 * MiB]), rng.randrange(1, 255)))
    for _ in range(rng.randint(1, 2)):
        out.append((REGION_A + rng.randrange(0, 18) * MiB, rng.choice([64 << 10, 1 * MiB]),
                    rng.randrange(1, 255)))
    return out


def prepare(a, b, vm: str, work: Path, cycle: list | None = None) -> Scenario:
    """Build the scenario with the primary ``a`` and the replica ``b`` (lab hosts, both
    running) and leave ``b`` killed after the cycle under test's ack. ``cycle``: what
    the cycle under test writes, (offset, length, pattern) — ``CYCLE`` by default."""
    cycle = list(cycle or CYCLE)
    work.mkdir(parents=True, exist_ok=True)
    a.run("vm", "create", vm, "--disk", "1536M")
    disk = Path(a.vm(vm)["disks"][0]["path"])
    _qemu_io(disk, "write -P 0x11 1100M 4M", "write -P 0x12 100M 1M")     # seed
    a.run("enable", vm, "--replica", b.address, "--point-interval", "1h")
    a.run("initial", vm)
    # A recovery point: the head is frozen, the next cycles write into a new one.
    first_head = b.vm(vm)["disks"][0]["path"]
    a.run("set", vm, "--point-interval", "1s")
    _qemu_io(disk, "write -P 0x13 1101M 64K")
    started = time.monotonic()
    while time.monotonic() - started < 1.1:     # the interval must pass (time, not a state)
        time.sleep(0.1)
    a.run("sync", vm)
    a.run("set", vm, "--point-interval", "1h")
    head = Path(b.vm(vm)["disks"][0]["path"])
    if str(head) == first_head:
        raise AssertionError("the sync did not make a recovery point (no new head)")
    # Region A filled (random bytes: stale L2 entries read as garbage), then mostly
    # trimmed: freed clusters that keep their bytes, where new allocations go first.
    blob = _random_file(work / "blob", 24 * MiB, seed=16)
    _qemu_io(disk, f"write -s {blob} {REGION_A} 24M")
    a.run("sync", vm)
    _qemu_io(disk, f"discard {REGION_A} 20M")
    a.run("sync", vm)
    # The replica's head lost region A's clusters (the trim reached it).
    mapped = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2",
                             str(head)], capture_output=True, text=True, check=True).stdout
    import json
    for ext in json.loads(mapped):
        if ext["start"] < REGION_A + 20 * MiB and ext["start"] + ext["length"] > REGION_A \
                and ext.get("depth", 0) == 0 and ext.get("data"):
            raise AssertionError(f"the trim did not reach the replica's head: {ext}")
    # The cycle under test: the head as last synced (a clean stop checkpoints), then a
    # daemon that logs the head's writes and holds its checkpoint back.
    b.stop()
    synced = work / "head.synced"
    shutil.copyfile(head, synced)
    logs = work / "logs"
    logs.mkdir()
    saved = {k: os.environ.get(k) for k in ("VMREPLICA_HEAD_WRITE_LOG",
                                             "VMREPLICA_CHECKPOINT_DELAY")}
    os.environ["VMREPLICA_HEAD_WRITE_LOG"] = str(logs)
    os.environ["VMREPLICA_CHECKPOINT_DELAY"] = "600"
    try:
        b.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    previous = work / "previous.qcow2"
    shutil.copyfile(disk, previous)
    _qemu_io(disk, *[f"write -P {p:#x} {o} {n}" for o, n, p in cycle])
    a.run("sync", vm)
    found = sorted(logs.glob(f"{head.name}.*.log"))
    if len(found) != 1:
        raise AssertionError(f"expected one write log of {head.name}, found {found}")
    acked = found[0].stat().st_size
    stages = list((b.home / "staging" / vm).glob("cycle-*.stage"))
    if len(stages) != 1:
        raise AssertionError(f"expected the acknowledged cycle staged, found {stages}")
    pid = b.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    _wait("the killed replica daemon to go", lambda: not Path(f"/proc/{pid}").exists()
          or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z")
    _wait("the head to be free of its server",
          lambda: subprocess.run(["qemu-img", "info", str(head)],
                                 capture_output=True).returncode == 0)
    log = work / "head.log"
    with open(found[0], "rb") as src, open(log, "wb") as dst:
        dst.write(src.read(acked))               # the writes made before the ack
    shutil.copyfile(head, work / "head.final")
    expected = work / "expected.qcow2"
    shutil.copyfile(disk, expected)
    db = work / "db"
    db.mkdir()
    for p in b.home.glob("state.db*"):
        shutil.copyfile(p, db / p.name)
    stage = work / "stage"
    shutil.copytree(b.home / "staging" / vm, stage)
    entries = parse_log(log)
    sc = Scenario(work, Path(b.home), vm, head, synced, log, expected, previous, db, stage,
                  extents=[(o, n) for o, n, _ in cycle])
    sc.log_entries = len(entries)
    sc.flushes = sum(e.is_flush for e in entries)
    # The new L2 table of region B landed on bytes region A left behind (stale).
    l2 = l2_table_offset(work / "head.final", REGION_B)
    with open(synced, "rb") as f:
        f.seek(l2)
        old = f.read(64 << 10)
    sc.l2_on_stale_bytes = l2 > 0 and old.strip(b"\0") != b""
    return sc


@dataclass
class Outcome:
    i: int
    ok: bool
    refused: str = ""
    mismatch_at: int | None = None
    earlier_data: bool = False
    detail: str = ""
    seconds: float = 0.0


class _Errors(logging.Handler):
    """The first error the recovery logged (with its exception's message)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.first = ""

    def emit(self, record):
        if not self.first:
            exc = record.exc_info[1] if record.exc_info else None
            self.first = record.getMessage() + (f": {type(exc).__name__}: {exc}" if exc else "")


def check_state(sc: Scenario, states: CrashStates, i: int, rng: random.Random) -> Outcome:
    """Write the state at ``i`` in place of the head, restore the replica's state store
    and stage as they were at the kill, run the start-up recovery in this process, and
    compare the head's guest-visible content with the cycle's source."""
    from vmreplica.replica.receiver import recover
    from vmreplica.service.home import Home
    from vmreplica.service.host import Host
    t0 = time.monotonic()
    chose = states.build(i, rng, sc.head)
    for p in sc.replica_home.glob("state.db*"):
        p.unlink()
    for p in sc.db.iterdir():
        shutil.copyfile(p, sc.replica_home / p.name)
    staging = sc.replica_home / "staging" / sc.vm
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(sc.stage, staging)
    out = Outcome(i, True, detail=str(chose))
    errors = _Errors()
    logging.getLogger("vmreplica").addHandler(errors)
    host = Host(Home(str(sc.replica_home)))
    try:
        redone = recover(host)     # a VM it cannot recover is logged and left in error
        if not redone:
            out.ok = False
            out.refused = "recovery re-applied nothing: " + (errors.first or "no error logged")
    except Exception as e:  # noqa: BLE001 — a refusal is a result here
        out.ok, out.refused = False, f"{type(e).__name__}: {e}"
    finally:
        logging.getLogger("vmreplica").removeHandler(errors)
        try:
            host.close()
        except Exception as e:  # noqa: BLE001
            if out.ok:
                out.ok, out.refused = False, f"close: {type(e).__name__}: {e}"
    if out.ok:
        proc = subprocess.run(["qemu-img", "compare", "-U", str(sc.expected), str(sc.head)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            out.ok = False
            text = (proc.stdout + proc.stderr).strip()
            out.detail += " " + text
            if proc.returncode == 1 and "offset" in text:
                at = int(text.split("offset")[1].split("!")[0].strip())
                out.mismatch_at = at
                out.earlier_data = not any(o <= at < o + n for o, n in sc.extents)
            else:
                out.refused = f"compare: {text}"
    out.seconds = time.monotonic() - t0
    return out


def positions(n_entries: int, count: int, rng: random.Random) -> list[int]:
    """``count`` crash positions in 0..n_entries, a fifth of them at the very end (a crash
    during the checkpoint's fdatasync), sorted (states build incrementally)."""
    at_end = max(1, count // 5)
    return sorted([rng.randint(0, n_entries) for _ in range(count - at_end)]
                  + [n_entries] * at_end)


def run(sc: Scenario, count: int, seed: int, report=print, stop_after: float | None = None):
    """Check ``count`` states; returns the outcomes."""
    rng = random.Random(seed)
    states = CrashStates(sc.synced.read_bytes(), parse_log(sc.log))
    outcomes = []
    t_start = time.monotonic()
    for i in positions(len(states.entries), count, rng):
        o = check_state(sc, states, i, rng)
        outcomes.append(o)
        if not o.ok:
            report(f"state at log position {i}/{len(states.entries)}: "
                   f"{o.refused or f'mismatch at {o.mismatch_at}'} ({o.detail})")
        if stop_after is not None and time.monotonic() - t_start > stop_after:
            break
    return outcomes


def summary(outcomes: list[Outcome], seconds: float) -> str:
    return (f"crash_states={len(outcomes)} "
            f"mismatches={sum(1 for o in outcomes if o.mismatch_at is not None)} "
            f"refusals={sum(1 for o in outcomes if o.refused)} "
            f"earlier_data_changed={sum(1 for o in outcomes if o.earlier_data)} "
            f"seconds={seconds:.1f}")
