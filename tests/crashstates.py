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

And the scenario (``Scenario``): real daemons (harness.lab), a 1.5 GiB disk, and the
check of each state through the real start-up recovery (recovery.recover).

Limits of the model: the file's size is taken as durable (a write past the end
extends it; the file system journals the new size); a write logged before a
FLUSH is taken as covered by it (QEMU logs a write once it completed, so this is true
for every write qcow2 waited for, which are the ones its ordering relies on).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmreplica.replica.heads import write_log_stem

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
            size = max(size, fh.tell())
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
    log: Path                  # the head's write log, cut once the cycle is applied
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


def _history(a, b, vm: str, work: Path, *enable: str) -> tuple[Path, Path]:
    """Everything before the step under test, through the real daemons: a 1.5 GiB disk
    seeded and copied, a recovery point (the head is a layer over the base), region A
    filled with random bytes then mostly trimmed (freed clusters that keep their bytes,
    where new allocations go first). Returns the primary's disk and the replica's head."""
    work.mkdir(parents=True, exist_ok=True)
    a.run("vm", "create", vm, "--disk", "1536M")
    disk = Path(a.vm(vm)["disks"][0]["path"])
    _qemu_io(disk, "write -P 0x11 1100M 4M", "write -P 0x12 100M 1M")     # seed
    a.run("enable", vm, "--replica", b.address, "--point-interval", "1h", *enable)
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
    b.vm(vm)               # (a view waits for the apply that follows the ack)
    # The replica's head lost region A's clusters (the trim reached it).
    mapped = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2",
                             str(head)], capture_output=True, text=True, check=True).stdout
    for ext in json.loads(mapped):
        if ext["start"] < REGION_A + 20 * MiB and ext["start"] + ext["length"] > REGION_A \
                and ext.get("depth", 0) == 0 and ext.get("data"):
            raise AssertionError(f"the trim did not reach the replica's head: {ext}")
    return disk, head


def _start_logging(b, logs: Path | None, checkpoint_delay: str = "600") -> None:
    """Start the replica daemon ``b`` logging its heads' writes into ``logs`` (none:
    no log) and holding its checkpoints back."""
    saved = {k: os.environ.get(k) for k in ("VMREPLICA_HEAD_WRITE_LOG",
                                             "VMREPLICA_CHECKPOINT_DELAY")}
    if logs is not None:
        os.environ["VMREPLICA_HEAD_WRITE_LOG"] = str(logs)
    else:
        os.environ.pop("VMREPLICA_HEAD_WRITE_LOG", None)
    os.environ["VMREPLICA_CHECKPOINT_DELAY"] = checkpoint_delay
    try:
        b.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kill(b, *images: Path) -> None:
    """SIGKILL the daemon of ``b`` (a power cut, as far as its process goes) and wait for
    its storage daemons to let go of ``images``."""
    pid = b.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    _wait("the killed replica daemon to go", lambda: not Path(f"/proc/{pid}").exists()
          or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z")
    for image in images:
        _wait(f"{image} to be free of its server",
              lambda image=image: subprocess.run(["qemu-img", "info", str(image)],
                                                 capture_output=True).returncode == 0)


def prepare(a, b, vm: str, work: Path, cycle: list | None = None) -> Scenario:
    """Build the scenario with the primary ``a`` and the replica ``b`` (lab hosts, both
    running) and leave ``b`` killed after the cycle under test's ack. ``cycle``: what
    the cycle under test writes, (offset, length, pattern) — ``CYCLE`` by default."""
    cycle = list(cycle or CYCLE)
    disk, head = _history(a, b, vm, work)
    # The cycle under test: the head as last synced (a clean stop checkpoints), then a
    # daemon that logs the head's writes and holds its checkpoint back.
    b.stop()
    synced = work / "head.synced"
    shutil.copyfile(head, synced)
    logs = work / "logs"
    logs.mkdir()
    _start_logging(b, logs)
    previous = work / "previous.qcow2"
    shutil.copyfile(disk, previous)
    _qemu_io(disk, *[f"write -P {p:#x} {o} {n}" for o, n, p in cycle])
    a.run("sync", vm)
    # Acknowledged once staged; the apply follows, and a view of the VM waits for it.
    # The states cover every crash from the first write to the checkpoint's sync: before
    # the ack and after it alike, the stage is what start-up applies again.
    b.vm(vm)
    found = sorted(logs.glob(f"{write_log_stem(head)}.*.log"))
    if len(found) != 1:
        raise AssertionError(f"expected one write log of {head.name}, found {found}")
    acked = found[0].stat().st_size
    stages = list((b.home / "staging" / vm).glob("cycle-*.stage"))
    if len(stages) != 1:
        raise AssertionError(f"expected the acknowledged cycle staged, found {stages}")
    _kill(b, head)
    log = work / "head.log"
    with open(found[0], "rb") as src, open(log, "wb") as dst:
        dst.write(src.read(acked))               # the apply's writes, up to its flush
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
    phase: str = "apply"


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
    from vmreplica.replica.recovery import recover
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
    phases: dict[str, int] = {}
    for o in outcomes:
        phases[o.phase] = phases.get(o.phase, 0) + 1
    return (f"crash_states={len(outcomes)} "
            f"mismatches={sum(1 for o in outcomes if o.mismatch_at is not None)} "
            f"refusals={sum(1 for o in outcomes if o.refused)} "
            f"earlier_data_changed={sum(1 for o in outcomes if o.earlier_data)} "
            f"seconds={seconds:.1f} "
            f"phases={','.join(f'{k}:{v}' for k, v in phases.items()) or '-'}")


# -- the state store as of any synced commit (SQLite WAL) ---------------------------------
#
# The store commits with synchronous=FULL: each commit's frames are appended to the WAL
# and fsynced before the call returns. A power cut between two commits leaves the WAL up
# to the last commit frame written (the frames of a torn commit fail their checksums and
# are ignored). So the store as of commit k is state.db as at the daemon's start plus the
# WAL cut just past commit k's frame — provided no checkpoint copied the WAL into
# state.db meanwhile (checked: the prefix without frames must be the state before).

_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _wal_sum(data: bytes, s0: int, s1: int, big: bool) -> tuple[int, int]:
    ints = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for k in range(0, len(ints), 2):
        s0 = (s0 + ints[k] + s1) & 0xFFFFFFFF
        s1 = (s1 + ints[k + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_commits(wal: bytes) -> list[int]:
    """Offsets just past each valid commit frame of a SQLite WAL, in order (frames of the
    header's salts with a valid checksum chain; the first invalid one ends it)."""
    if len(wal) < 32:
        return []
    magic, _version, page, _seq, salt1, salt2, c1, c2 = struct.unpack_from(">8I", wal, 0)
    if magic not in _WAL_MAGIC:
        raise ValueError(f"not a SQLite WAL (magic {magic:#x})")
    big = bool(magic & 1)
    s0, s1 = _wal_sum(wal[:24], 0, 0, big)
    if (s0, s1) != (c1, c2):
        return []
    out, pos, size = [], 32, 24 + page
    while pos + size <= len(wal):
        _pgno, commit, f1, f2, k1, k2 = struct.unpack_from(">6I", wal, pos)
        if (f1, f2) != (salt1, salt2):
            break
        s0, s1 = _wal_sum(wal[pos:pos + 8], s0, s1, big)
        s0, s1 = _wal_sum(wal[pos + 24:pos + size], s0, s1, big)
        if (s0, s1) != (k1, k2):
            break
        pos += size
        if commit:
            out.append(pos)
    return out


@dataclass
class DbState:
    """The store as of one commit: the WAL bytes kept, and what recovery reads of it."""
    end: int
    rel: dict
    points: list
    staged: list


class Store:
    """state.db and state.db-wal copied at the kill; ``states``: the store after each
    commit (the first: no WAL frame at all)."""

    def __init__(self, where: Path, vm: str):
        self.where = Path(where)
        self.main = (self.where / "state.db").read_bytes()
        wal = self.where / "state.db-wal"
        self.wal = wal.read_bytes() if wal.exists() else b""
        self.states: list[DbState] = []
        with tempfile.TemporaryDirectory(prefix="vmr-db-") as t:
            for end in [0] + wal_commits(self.wal):
                self.write(end, Path(t))
                con = sqlite3.connect(Path(t) / "state.db")
                try:
                    con.row_factory = sqlite3.Row
                    rows = con.execute("SELECT * FROM relationships WHERE vm=?", (vm,)).fetchall()
                    rel = dict(rows[0]) if rows else {}
                    rel.update(json.loads(rel.pop("data", None) or "{}"))
                    pts = [dict(r) for r in con.execute(
                        "SELECT id, layer, point_time FROM recovery_points WHERE vm=? "
                        "ORDER BY id", (vm,))]
                    staged = [r[0] for r in con.execute(
                        "SELECT cycle FROM staged_cycles WHERE vm=? ORDER BY cycle", (vm,))]
                finally:
                    con.close()
                self.states.append(DbState(end, rel, pts, staged))

    def write(self, end: int, home: Path) -> None:
        """The store as of the commit ending at WAL offset ``end``, into ``home``."""
        for p in Path(home).glob("state.db*"):
            p.unlink()
        (Path(home) / "state.db").write_bytes(self.main)
        if end:
            (Path(home) / "state.db-wal").write_bytes(self.wal[:end])


def _copy_store(home: Path, to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    for p in Path(home).glob("state.db*"):
        shutil.copyfile(p, to / p.name)
    return to


# -- guest-visible contents, block by block ----------------------------------------------

def _raw(image: Path, out: Path) -> Path:
    """The guest-visible contents of a qcow2 chain as a sparse raw file."""
    out.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)],
                   check=True, capture_output=True)
    return out


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def differing_blocks(x: Path, y: Path, block: int) -> set[int]:
    """The ``block``-sized blocks in which two raw files of one size differ."""
    blocks = set()
    for path in (x, y):
        for start, end in _data_ranges(path):
            blocks.update(range(start // block, (end + block - 1) // block))
    out = set()
    with open(x, "rb") as fx, open(y, "rb") as fy:
        for b in sorted(blocks):
            fx.seek(b * block)
            fy.seek(b * block)
            if fx.read(block) != fy.read(block):
                out.add(b)
    return out


def _recover_in_process(home: Path, vm: str, inspect=None) -> tuple[list, str, object]:
    """The real start-up recovery on ``home``, in this process: (what it re-applied, the
    first error it raised or logged, what ``inspect(host)`` returned before the close)."""
    from vmreplica.replica.recovery import recover
    from vmreplica.service.home import Home
    from vmreplica.service.host import Host
    errors = _Errors()
    logging.getLogger("vmreplica").addHandler(errors)
    problem, redone, seen = "", [], None
    host = Host(Home(str(home)))
    try:
        redone = recover(host)
        rel = host.store.relationship(vm)
        if rel.state == "error" or rel.apply_pending:
            problem = (f"{vm} left in {rel.state}"
                       f"{' with apply_pending' if rel.apply_pending else ''}: "
                       f"{rel.last_error or errors.first or 'no error logged'}")
        elif errors.first:
            problem = f"the recovery logged an error: {errors.first}"
        if inspect is not None and not problem:
            seen = inspect(host)
    except Exception as e:  # noqa: BLE001 — a refusal is a result here
        problem = f"{type(e).__name__}: {e}"
    finally:
        logging.getLogger("vmreplica").removeHandler(errors)
        try:
            host.close()
        except Exception as e:  # noqa: BLE001
            problem = problem or f"close: {type(e).__name__}: {e}"
    return redone, problem, seen


def _compare(expected: Path, image: Path) -> tuple[bool, int | None, str]:
    proc = subprocess.run(["qemu-img", "compare", "-U", str(expected), str(image)],
                          capture_output=True, text=True)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return True, None, text
    if proc.returncode == 1 and "offset" in text:
        return False, int(text.split("offset")[1].split("!")[0].strip()), text
    return False, None, text


def _store_rel(home: Path, vm: str) -> dict:
    """The relationship row of a stopped host's store (read from a scratch copy)."""
    with tempfile.TemporaryDirectory(prefix="vmr-db-") as t:
        _copy_store(home, Path(t))
        con = sqlite3.connect(Path(t) / "state.db")
        try:
            con.row_factory = sqlite3.Row
            row = dict(con.execute("SELECT * FROM relationships WHERE vm=?", (vm,)).fetchone())
        finally:
            con.close()
    row.update(json.loads(row.pop("data") or "{}"))
    return row


# -- phase: a resync -----------------------------------------------------------------------
#
# `vmreplica resync VM` after the primary's tracking broke: the replica's manifest (its
# heads read whole, the index not trusted), then the differing blocks written straight
# into the heads through an O_DIRECT head server (not staged), the index synced, the
# relationship recorded as replicating. Crash states: the head's writes as logged, the
# store as of the last commit before the first write (state resynchronizing, index_valid
# false) — or, once every write is flushed, any later commit. Recovery: start-up, then
# the primary's resync run again (what its scheduler does by itself once the replica
# answers: its failed resync left it resync_required).

SCAN_BLOCK = 64 << 10
# What the primary's disk gets while its tracking is broken (op, offset, length, pattern):
# region B's new L2 table, region A's freed clusters, scattered overwrites of data of
# earlier cycles (one not block-aligned), and a trim of seeded data (zero records).
RESYNC = [("write", REGION_B + 40 * MiB, 2 * MiB, 0x6b),
          ("write", REGION_B + 200 * MiB + (192 << 10), 320 << 10, 0x6c),
          ("write", REGION_A + 2 * MiB, 1 * MiB, 0x6d),
          ("write", REGION_A + 21 * MiB + 4096, 8192, 0x6a),
          ("write", 1100 * MiB + (512 << 10), 128 << 10, 0x6e),
          ("write", 100 * MiB + (64 << 10), 64 << 10, 0x6f),
          ("write", 800 * MiB, 64 << 10, 0x70),
          ("discard", 1102 * MiB, 1 * MiB, 0)]


def random_resync(rng: random.Random) -> list[tuple[str, int, int, int]]:
    """A resync like ``RESYNC`` at random places: region B (new L2 tables), region A's
    trimmed part, overwrites of the seeded data, a trim; some not block-aligned."""
    out = []
    for _ in range(rng.randint(1, 3)):
        out.append(("write", REGION_B + rng.randrange(0, 500) * MiB + rng.randrange(64) * 4096,
                    rng.choice([8 << 10, 64 << 10, 320 << 10, 1 * MiB, 2 * MiB]),
                    rng.randrange(1, 255)))
    for _ in range(rng.randint(1, 2)):
        out.append(("write", REGION_A + rng.randrange(0, 23) * MiB,
                    rng.choice([64 << 10, 1 * MiB]), rng.randrange(1, 255)))
    out.append(("write", 1100 * MiB + rng.randrange(48) * 65536, 64 << 10,
                rng.randrange(1, 255)))
    out.append(("write", rng.randrange(200, 1000) * MiB, 64 << 10, rng.randrange(1, 255)))
    out.append(("discard", 1100 * MiB + rng.randrange(2, 4) * MiB, 1 * MiB, 0))
    return out


def _closed_window() -> str:
    """A resync window that does not hold the next hour (automatic resyncs wait)."""
    t, u = time.localtime(time.time() + 3600), time.localtime(time.time() + 7200)
    return f"{t.tm_hour:02d}:{t.tm_min:02d}-{u.tm_hour:02d}:{u.tm_min:02d}"


def _drop_bitmaps(disk: Path) -> None:
    """Change tracking broken behind vmreplica's back (as tests/e2e/test_resync.py)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    for bm in info.get("format-specific", {}).get("data", {}).get("bitmaps") or []:
        subprocess.run(["qemu-img", "bitmap", "--remove", str(disk), bm["name"]], check=True)


@dataclass
class ResyncScenario:
    work: Path
    replica_home: Path
    vm: str
    head: Path
    synced: Path               # the head as last synced, before the resync
    log: Path                  # its write log, cut at the resync's answer
    expected: Path             # the primary's disk (the resync's source)
    before_raw: Path           # the replica's guest-visible contents before the resync
    store: Store               # state.db* at the kill, with every commit's state
    during: int                # index in store.states: the resync applying
    later: list                # indexes of the commits after the last write's flush
    index: Path                # the hash index files at the kill
    differing: set             # SCAN_BLOCK blocks the resync had to rewrite
    moved: int = 0             # what the resync said it moved
    log_entries: int = 0
    flushes: int = 0
    l2_on_stale_bytes: bool = False


def prepare_resync(a, b, vm: str, work: Path, layout: list | None = None) -> ResyncScenario:
    """The history, then the primary's tracking broken while its powered-off disk changes
    (``layout``: RESYNC by default), then `resync VM --now` into a replica daemon that
    logs its heads' writes; the replica killed after the resync's answer."""
    layout = list(layout or RESYNC)
    disk, head = _history(a, b, vm, work, "--resync-window", _closed_window())
    b.stop()
    synced = work / "head.synced"
    shutil.copyfile(head, synced)
    before_raw = _raw(head, work / "before.raw")
    logs = work / "logs"
    logs.mkdir()
    _start_logging(b, logs)
    _qemu_io(disk, *[f"write -P {p:#x} {o} {n}" if op == "write" else f"discard {o} {n}"
                     for op, o, n, p in layout])
    _drop_bitmaps(disk)
    broke = a.run("sync", vm, check=False)
    if broke.returncode == 0 or a.json("status", vm)[0]["state"] != "resync_required":
        raise AssertionError(f"the tracking break was not noticed: {broke.stderr}")
    info = a.json("resync", vm, "--now")
    found = sorted(logs.glob(f"{write_log_stem(head)}.*.log"))
    if len(found) != 1:
        raise AssertionError(f"expected one write log of {head.name}, found {found}")
    acked = found[0].stat().st_size
    _kill(b, head)
    log = work / "head.log"
    with open(found[0], "rb") as src, open(log, "wb") as dst:
        dst.write(src.read(acked))
    shutil.copyfile(head, work / "head.final")
    expected = work / "expected.qcow2"
    shutil.copyfile(disk, expected)
    store = Store(_copy_store(b.home, work / "db"), vm)
    rel = store.states[-1].rel
    index = work / "index"
    index.mkdir()
    for p in (Path(rel["storage"]) / vm).glob("*.index"):
        shutil.copyfile(p, index / p.name)
    # The store's history: the first state (no WAL frame) is the one before (the
    # replica never heard of the break), then the receive's "resynchronizing, index not
    # trusted" before the first write, then "index trusted", then "replicating".
    first = store.states[0].rel
    if first.get("state") != "replicating" or not first.get("index_valid"):
        raise AssertionError(f"the store was checkpointed during the resync: its first "
                             f"state is {first.get('state')}, index_valid="
                             f"{first.get('index_valid')}")
    applying = [k for k, st in enumerate(store.states)
                if st.rel.get("state") == "resynchronizing" and not st.rel.get("index_valid")]
    if not applying:
        raise AssertionError("no commit of the store shows the resync applying")
    during = applying[-1]
    expected_raw = _raw(expected, work / "expected.raw")
    differing = differing_blocks(before_raw, expected_raw, SCAN_BLOCK)
    expected_raw.unlink()
    moved = int(info.get("bytes_moved", -1))
    if moved != len(differing) * SCAN_BLOCK:
        raise AssertionError(f"the resync moved {moved} bytes, the disks differ in "
                             f"{len(differing)} blocks of {SCAN_BLOCK}")
    entries = parse_log(log)
    sc = ResyncScenario(work, Path(b.home), vm, head, synced, log, expected, before_raw,
                        store, during, list(range(during, len(store.states))), index,
                        differing, moved, len(entries), sum(e.is_flush for e in entries))
    l2 = l2_table_offset(work / "head.final", REGION_B)
    with open(synced, "rb") as f:
        f.seek(l2)
        old = f.read(64 << 10)
    sc.l2_on_stale_bytes = l2 > 0 and old.strip(b"\0") != b""
    return sc


def check_resync_state(sc: ResyncScenario, states: CrashStates, i: int,
                       rng: random.Random, a, b) -> Outcome:
    """The state at ``i`` in place of the head, the store as of the matching commit, the
    index files as at the kill; start-up recovery in this process; every block outside
    the resync's must read as before it; then the primary's resync again through the real
    daemons, after which the head must equal the primary's disk byte for byte."""
    t0 = time.monotonic()
    chose = states.build(i, rng, sc.head)
    k = sc.during if i < len(states.entries) else rng.choice(sc.later)
    chose["store"] = f"{sc.store.states[k].rel.get('state')}/index_valid=" \
                     f"{bool(sc.store.states[k].rel.get('index_valid'))}"
    sc.store.write(sc.store.states[k].end, sc.replica_home)
    storage = Path(sc.store.states[-1].rel["storage"]) / sc.vm
    for p in sc.index.iterdir():
        shutil.copyfile(p, storage / p.name)
    shutil.rmtree(sc.replica_home / "staging" / sc.vm, ignore_errors=True)
    out = Outcome(i, True, detail=str(chose), phase="resync")
    _, problem, _ = _recover_in_process(sc.replica_home, sc.vm)
    if problem:
        out.ok, out.refused = False, problem
    if out.ok:
        check = subprocess.run(["qemu-img", "check", "-U", "--output=json", str(sc.head)],
                               capture_output=True, text=True)
        if check.returncode not in (0, 3):
            out.ok, out.refused = False, f"qemu-img check: {check.stdout[-300:]}"
    if out.ok:
        now = _raw(sc.head, sc.work / "state.raw")
        changed = differing_blocks(sc.before_raw, now, SCAN_BLOCK) - sc.differing
        now.unlink()
        if changed:
            out.ok, out.earlier_data = False, True
            out.mismatch_at = min(changed) * SCAN_BLOCK
            out.detail += f" {len(changed)} block(s) outside the resync changed"
    if out.ok:
        b.start()
        try:
            again = a.json("resync", sc.vm, "--now")
            out.detail += f" rerun_moved={again.get('bytes_moved')}"
        except Exception as e:  # noqa: BLE001
            out.ok, out.refused = False, f"the resync again: {e}"
        finally:
            b.stop()
    if out.ok:
        same, at, text = _compare(sc.expected, sc.head)
        if not same:
            out.ok, out.mismatch_at = False, at
            out.refused = "" if at is not None else f"compare: {text}"
            out.detail += " after the resync again: " + text
    out.seconds = time.monotonic() - t0
    return out


def run_resync(sc: ResyncScenario, count: int, seed: int, a, b, report=print,
               stop_after: float | None = None) -> list[Outcome]:
    rng = random.Random(seed)
    states = CrashStates(sc.synced.read_bytes(), parse_log(sc.log))
    outcomes = []
    t_start = time.monotonic()
    for i in positions(len(states.entries), count, rng):
        o = check_resync_state(sc, states, i, rng, a, b)
        outcomes.append(o)
        if not o.ok:
            report(f"resync state at log position {i}/{len(states.entries)}: "
                   f"{o.refused or f'mismatch at {o.mismatch_at}'} ({o.detail})")
        if stop_after is not None and time.monotonic() - t_start > stop_after:
            break
    return outcomes


# -- phase: a recovery point's rotation ----------------------------------------------------
#
# A cycle whose trailer asks for a point is applied durably (flushed, synced), recorded
# with `pending_point`, then points.create: the head server closed, store.freeze (qemu-img
# create of a new empty layer on every head, the files and their directory fsynced),
# then the point row and the new chains committed, then pending_point cleared, then the
# staged row and file dropped. Crash states: the store as of each commit from the one
# that recorded the pending point on; with it, the new layer file as a power cut can
# leave it — absent, empty, cut short, full length with pages never written, complete —
# where the code's order allows (a layer the store records was synced first: complete);
# the VM's description (vm.json, written after the chains' commit, not synced) old or
# new; the staged cycle present while its row is.

POINT_CYCLE = [(REGION_B + 64 * MiB, 1 * MiB, 0x7b), (REGION_A + 6 * MiB, 256 << 10, 0x7c),
               (1100 * MiB, 64 << 10, 0x7d)]
NEXT_CYCLE = [(REGION_B + 96 * MiB, 128 << 10), (300 * MiB, 64 << 10)]
LAYER_VARIANTS = ("absent", "empty", "cut", "holes", "complete")


@dataclass
class RotationScenario:
    work: Path
    replica_home: Path
    vm: str
    old_head: Path             # the head the point froze
    new_head: Path             # the layer made on top of it
    saved: Path                # copies: both files as at the kill, vm.json, the stage
    layer_dir: Path
    layers: list               # layer file names in layer_dir at the kill
    vm_json: Path              # the replica VM's description in the replica's home
    expected: Path             # the primary's disk after the point's cycle
    disk: Path                 # the primary's disk (live)
    store: Store
    first: int                 # index in store.states: pending_point recorded
    points_before: int
    next_pattern: int = 0x80

    def classes(self) -> list[tuple[str, list[int]]]:
        """The store's states from ``first`` on, grouped by what recovery sees."""
        out: dict[str, list[int]] = {}
        depth = len(next(iter(self.store.states[0].rel["chains"].values())))
        for k in range(self.first, len(self.store.states)):
            st = self.store.states[k]
            d = len(next(iter(st.rel["chains"].values())))
            name = (f"pending={'yes' if st.rel.get('pending_point') else 'no'},"
                    f"points={len(st.points)},chain={'new' if d > depth else 'old'},"
                    f"staged={'yes' if st.staged else 'no'}")
            out.setdefault(name, []).append(k)
        return list(out.items())


def _catch_files(directory: Path, pattern: str, into: Path, stop: threading.Event) -> None:
    """Hard-link every file matching ``pattern`` that appears in ``directory`` into
    ``into`` (a staged cycle that makes a point is dropped a few ms after its apply)."""
    into.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        if directory.exists():
            for p in directory.glob(pattern):
                try:
                    os.link(p, into / p.name)
                except (FileExistsError, FileNotFoundError):
                    pass
        time.sleep(0.0005)


def prepare_rotation(a, b, vm: str, work: Path, cycle: list | None = None) -> RotationScenario:
    """The history, then a cycle that makes a recovery point (``cycle``: POINT_CYCLE by
    default) into a replica daemon started after a clean stop (its WAL then holds every
    commit of the point); the replica killed after the cycle's answer."""
    cycle = list(cycle or POINT_CYCLE)
    disk, head = _history(a, b, vm, work)
    b.stop()
    _start_logging(b, None)
    before = len(b.json("points", vm)) - 1
    stop = threading.Event()
    caught = work / "caught"
    catcher = threading.Thread(target=_catch_files, daemon=True, name="catch-stage",
                               args=(b.home / "staging" / vm, "cycle-*.stage", caught, stop))
    catcher.start()
    try:
        a.run("set", vm, "--point-interval", "1s")
        _qemu_io(disk, *[f"write -P {p:#x} {o} {n}" for o, n, p in cycle])
        started = time.monotonic()
        while time.monotonic() - started < 1.1:     # the interval must pass
            time.sleep(0.1)
        a.run("sync", vm)
        a.run("set", vm, "--point-interval", "1h")
    finally:
        stop.set()
        catcher.join(timeout=10)
    new_head = Path(b.vm(vm)["disks"][0]["path"])
    if new_head == head:
        raise AssertionError("the cycle did not make a recovery point (no new head)")
    _kill(b, head, new_head)
    saved = work / "saved"
    saved.mkdir()
    shutil.copyfile(head, saved / "old_head")
    shutil.copyfile(new_head, saved / "new_head")
    vm_json = b.home / "vms" / vm / "vm.json"
    shutil.copyfile(vm_json, saved / "vm.json")
    stages = sorted(caught.glob("cycle-*.stage"))
    if len(stages) != 1:
        raise AssertionError(f"expected the point's cycle caught staged, found {stages}")
    shutil.copyfile(stages[0], saved / stages[0].name)
    expected = work / "expected.qcow2"
    shutil.copyfile(disk, expected)
    store = Store(_copy_store(b.home, work / "db"), vm)
    if store.states[0].rel.get("pending_point") or \
            len(store.states[0].points) != before:
        raise AssertionError("the store was checkpointed during the point's cycle")
    first = next((k for k, st in enumerate(store.states) if st.rel.get("pending_point")), None)
    if first is None:
        raise AssertionError("no commit of the store records the pending point")
    return RotationScenario(work, Path(b.home), vm, head, new_head, saved, head.parent,
                            sorted(p.name for p in head.parent.iterdir()), vm_json,
                            expected, disk, store, first, before)


def _layer_variant(sc: RotationScenario, variant: str, rng: random.Random) -> str:
    data = (sc.saved / "new_head").read_bytes()
    sc.new_head.unlink(missing_ok=True)
    if variant == "absent":
        return variant
    if variant == "empty":
        data = b""
    elif variant == "cut":
        cut = rng.randrange(1, len(data))
        data, variant = data[:cut], f"cut at {cut}/{len(data)}"
    elif variant == "holes":
        pages = bytearray(data)
        n = len(pages) // PAGE
        lost = sorted(rng.sample(range(n), rng.randint(1, max(1, n // 2))))
        for p in lost:
            pages[p * PAGE:(p + 1) * PAGE] = bytes(PAGE)
        data, variant = bytes(pages), f"pages {lost[:6]}{'...' if len(lost) > 6 else ''} zero"
    sc.new_head.write_bytes(data)
    return variant


def rotation_states(sc: RotationScenario, count: int, rng: random.Random) -> list[tuple]:
    """``count`` states (store index, layer variant, vm.json old?). Every combination the
    code's order allows comes first, the classes of store states interleaved (so a few
    states cover every class): before the point is recorded, the new layer in any of
    LAYER_VARIANTS and the description old — or new once the layer is complete (it is
    saved in the commit's transaction, after the layer's sync); once recorded, the layer
    complete (synced first) and the description old or new (saved unsynced). Then at
    random among them."""
    depth = len(next(iter(sc.store.states[0].rel["chains"].values())))
    per_class = []
    for _name, ks in sc.classes():
        st = sc.store.states[ks[0]]
        new_chain = len(next(iter(st.rel["chains"].values()))) > depth
        recorded = new_chain or len(st.points) > sc.points_before
        combos = ([("complete", False), ("complete", True)] if recorded else
                  [(v, True) for v in LAYER_VARIANTS] + [("complete", False)])
        per_class.append([(ks, v, old) for v, old in combos])
    ordered = [c[r] for r in range(max(map(len, per_class))) for c in per_class if r < len(c)]
    out = []
    for n in range(count):
        ks, variant, old_json = ordered[n] if n < len(ordered) else rng.choice(ordered)
        out.append((rng.choice(ks), variant, old_json))
    return out


def check_rotation_state(sc: RotationScenario, k: int, variant: str, old_json: bool,
                         rng: random.Random, a, b) -> Outcome:
    """Lay the state out in the replica's home, run the start-up recovery in this process
    and check: the VM is not in error, its chains' files open, its head reads as the
    point's cycle's source, its description names the head, `points` lists only points
    whose layers exist (and no point twice); then the primary's next cycle through the
    real daemons, after which the head must equal the primary's disk."""
    t0 = time.monotonic()
    st = sc.store.states[k]
    for name in os.listdir(sc.layer_dir):
        if name not in sc.layers or name == sc.new_head.name:
            (sc.layer_dir / name).unlink()
    shutil.copyfile(sc.saved / "old_head", sc.old_head)
    made = _layer_variant(sc, variant, rng)
    desc = json.loads((sc.saved / "vm.json").read_text())
    if old_json:
        for d in desc["disks"]:
            d["path"] = str(sc.old_head)
    sc.vm_json.write_text(json.dumps(desc, indent=2, sort_keys=True))
    staging = sc.replica_home / "staging" / sc.vm
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if st.staged:
        for p in sc.saved.glob("cycle-*.stage"):
            shutil.copyfile(p, staging / p.name)
    sc.store.write(st.end, sc.replica_home)
    detail = {"commit": k, "pending": bool(st.rel.get("pending_point")),
              "points": len(st.points), "staged": bool(st.staged), "layer": made,
              "vm.json": "old" if old_json else "new"}
    out = Outcome(k, True, detail=str(detail), phase="rotation")

    def inspect(host):
        from vmreplica.replica import points
        rel = host.store.relationship(sc.vm)
        listing = points.listing(host, sc.vm)
        return rel, listing, host.driver.inspect(sc.vm)
    _, problem, seen = _recover_in_process(sc.replica_home, sc.vm, inspect)
    if problem:
        out.ok, out.refused = False, problem
    if out.ok:
        rel, listing, info = seen
        chain = next(iter(rel.chains.values()))
        problems = []
        for layer in chain:
            if subprocess.run(["qemu-img", "info", "-U", layer],
                              capture_output=True).returncode != 0:
                problems.append(f"chain layer {layer} does not open")
        pts = [p for p in listing if p["id"] != "latest"]
        for p in pts:
            for path in p["paths"].values():
                if not Path(path).exists() or subprocess.run(
                        ["qemu-img", "info", "-U", path], capture_output=True).returncode != 0:
                    problems.append(f"point {p['id']} lists {path}, which does not open")
        layers = [tuple(p["paths"].values()) for p in pts]
        if len(set(layers)) != len(layers):
            problems.append("two points share a layer")
        if len(pts) != sc.points_before + 1:
            problems.append(f"{len(pts)} points listed, {sc.points_before + 1} made "
                            f"({[(p['id'], p['time']) for p in pts]})")
        if any(p["paths"][d] == chain[-1] for p in pts for d in p["paths"]):
            problems.append("a point's layer is the head (it would change)")
        if info.disks[0].path != chain[-1]:
            problems.append(f"the VM's description names {info.disks[0].path}, the "
                            f"chain's head is {chain[-1]}")
        leftover = sorted(set(os.listdir(sc.layer_dir)) - {Path(x).name for x in chain})
        leftover = [x for x in leftover if x.startswith("layer-")]
        if leftover:
            out.detail += f" leftover={leftover}"
        if problems:
            out.ok, out.refused = False, "; ".join(problems)
        else:
            same, at, text = _compare(sc.expected, Path(chain[-1]))
            if not same:
                out.ok, out.mismatch_at = False, at
                out.refused = "" if at is not None else f"compare: {text}"
                out.detail += " " + text
    if out.ok:
        sc.next_pattern = sc.next_pattern % 250 + 1
        _qemu_io(sc.disk, *[f"write -P {sc.next_pattern:#x} {o} {n}" for o, n in NEXT_CYCLE])
        b.start()
        try:
            a.run("sync", sc.vm)
        except Exception as e:  # noqa: BLE001
            out.ok, out.refused = False, f"the next cycle: {e}"
        finally:
            b.stop()
        if out.ok:
            head = next(iter(_store_rel(sc.replica_home, sc.vm)["chains"].values()))[-1]
            same, at, text = _compare(sc.disk, Path(head))
            if not same:
                out.ok, out.mismatch_at = False, at
                out.refused = "" if at is not None else f"compare: {text}"
                out.detail += " after the next cycle: " + text
    out.seconds = time.monotonic() - t0
    return out


def run_rotation(sc: RotationScenario, count: int, seed: int, a, b, report=print,
                 stop_after: float | None = None) -> list[Outcome]:
    rng = random.Random(seed)
    outcomes = []
    t_start = time.monotonic()
    for k, variant, old_json in rotation_states(sc, count, rng):
        o = check_rotation_state(sc, k, variant, old_json, rng, a, b)
        outcomes.append(o)
        if not o.ok:
            report(f"rotation state {o.detail}: "
                   f"{o.refused or f'mismatch at {o.mismatch_at}'}")
        if stop_after is not None and time.monotonic() - t_start > stop_after:
            break
    return outcomes
