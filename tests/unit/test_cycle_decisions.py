"""Issue 18: the decisions of a replication cycle (primary.cycle.run_cycle, and the gates
in front of it), proven in milliseconds against small fakes of its interfaces.

The fakes: a VM whose disks are byte arrays and whose tracking bitmaps record the
extents written while each was the newest (``VM``); a block session and a tracker over it
whose points ship what the ``since`` bitmap recorded and keep the contract of
tracking.base.Point — ``commit`` drops ``since``, ``abort`` folds ``new`` back into it
(``Session``, ``Tracker``, ``ChangePoint``, and ``ComparePoint`` for a resync); a replica
that reads each cycle stream with the real wire reader and acknowledges it, or fails
(``Replica``, the peer client's ``request``). The state store is the real one, on a
SQLite file in the test's directory.

(Over 500 lines for a stated reason: the fakes are about half of it, used by these tests
only, and read best beside the rules that lean on them.)
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from blake3 import blake3

from vmreplica.domain import extents as ex
from vmreplica.domain.relationship import Relationship
from vmreplica.domain.states import State
from vmreplica.errors import (
    Conflict,
    IntegrityError,
    OperationError,
    Superseded,
    TrackingError,
    Unreachable,
)
from vmreplica.hypervisor.base import Export, VMInfo
from vmreplica.primary import relationship as operations
from vmreplica.primary.cycle import run_cycle
from vmreplica.service.scheduler import Scheduler
from vmreplica.service.store import Store
from vmreplica.tracking import mixed, scan
from vmreplica.tracking.base import Chunk
from vmreplica.tracking.bitmap import bitmap_prefix
from vmreplica.transport import wire

VM_NAME = "web1"
REL_ID = "0123456789abcdef0123456789abcdef"
PREFIX = bitmap_prefix(REL_ID)          # vmreplica-01234567-
DISKS = ["disk0", "disk1"]
SIZE = 1 << 20                          # each disk: 16 blocks of 64 KiB
K64 = 64 << 10


# -- the VM, its disks and their tracking bitmaps ------------------------------------------

class VM:
    """Disks as byte arrays; each tracking bitmap holds the extents (disk, kind, offset,
    length) written while it was the newest one (the one recording)."""

    def __init__(self):
        self.content = {d: bytearray(SIZE) for d in DISKS}
        self.bitmaps: dict[str, dict[tuple[str, int, int], str]] = {}
        self.recording: str | None = None
        self.log: list = []          # what happened, in order
        self.state = "running"
        self.agent_works = True
        self.stored_bitmap = lambda: None   # the tracking point the state store names

    def write(self, disk: str, offset: int, data: bytes) -> None:
        self.content[disk][offset:offset + len(data)] = data
        self._record(disk, offset, len(data), ex.DATA)

    def trim(self, disk: str, offset: int, length: int) -> None:
        self.content[disk][offset:offset + length] = bytes(length)
        self._record(disk, offset, length, ex.TRIMMED)

    def _record(self, disk, offset, length, kind) -> None:
        if self.recording is not None:
            self.bitmaps[self.recording][(disk, offset, length)] = kind


class Session:
    """A BlockSession (hypervisor.base) over ``VM``: the parts a cycle and these points use."""

    live = False
    paused_seconds = 0.0

    def __init__(self, vm: VM):
        self.vm = vm
        self.running = vm.state == "running"

    def __enter__(self):
        self.vm.log.append("session")
        return self

    def __exit__(self, *exc):
        return None

    def freeze(self, disks: list[str], since: str | None, new: str) -> dict[str, Export]:
        self.vm.log.append(("freeze", since, new))
        self.vm.bitmaps[new] = {}
        self.vm.recording = new
        return {d: Export(socket="", name=d, size=SIZE) for d in disks}

    def end_pause(self) -> None:
        pass

    def release(self, disks: list[str], names: list[str]) -> None:
        self.vm.log.append(("release", sorted(names)))
        for n in names:
            self.vm.bitmaps.pop(n, None)


class Driver:
    """The parts of hypervisor.base.Driver a cycle (and its failure paths) call."""

    def __init__(self, vm: VM):
        self.vm = vm
        self.stopped: list = []
        self.tracking = {d: "bitmap" for d in DISKS}   # (domain.tracking's words)

    def block_session(self, name: str) -> Session:
        assert name == VM_NAME
        return Session(self.vm)

    def disk_tracking(self, name: str) -> dict[str, str]:
        return dict(self.tracking)

    def inspect(self, name: str) -> VMInfo:
        return VMInfo(name, "uuid", self.vm.state, 256)

    def stop(self, name: str, force: bool = False, timeout: float = 60.0) -> None:
        self.stopped.append((name, force))
        self.vm.state = "stopped"

    def freeze_filesystems(self, name: str, timeout: float = 15.0) -> None:
        if not self.vm.agent_works:
            raise OperationError("the guest agent does not answer")
        self.vm.log.append("fsfreeze")

    def thaw_filesystems(self, name: str) -> None:
        self.vm.log.append("fsthaw")


class MemoryExport:
    """The libnbd calls a digest manifest makes (tracking.scan.manifest), on bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def get_size(self) -> int:
        return len(self.data)

    def block_status(self, count, offset, cb):
        cb("base:allocation", offset, [count, 0], 0)     # all of it allocated data

    def aio_pread(self, buf, offset):
        buf[:] = self.data[offset:offset + len(buf)]
        return 1

    def aio_command_completed(self, cookie) -> bool:
        return True

    def poll(self, timeout) -> None:
        pass


class ChangePoint:
    """A frozen change point (tracking.base.Point): what ``since`` recorded, read from the
    disks as they were at the freeze; the whole allocated disks without ``since``."""

    compared: int | None = None
    hold_pause = False

    def __init__(self, session: Session, disks: list[str], since: str | None, new: str):
        self.session, self.vm, self.disks = session, session.vm, disks
        self.since, self.new = since, new
        self.exports = session.freeze(disks, since, new)
        self.readers: dict = {}
        self.read_bytes = 0
        self.costs: dict = {}
        self.frozen = {d: bytes(self.vm.content[d]) for d in disks}
        if since is None:
            extents = [(d, o, K64, ex.DATA) for d in disks for o in range(0, SIZE, K64)
                       if any(self.frozen[d][o:o + K64])]
        else:
            extents = [(d, o, n, k) for (d, o, n), k in sorted(self.vm.bitmaps[since].items())]
        self.plan = extents

    def chunks(self):
        for disk, offset, length, kind in self.plan:
            if kind == ex.DATA:
                self.read_bytes += length
                yield Chunk(disk, kind, offset, length, self.frozen[disk][offset:offset + length])
            else:
                yield Chunk(disk, kind, offset, length)

    def dirty_bytes(self) -> int:
        return sum(n for _, _, n, _ in self.plan)

    def data_bytes(self) -> int:
        return sum(n for _, _, n, k in self.plan if k == ex.DATA)

    @property
    def tracking(self) -> str:
        return self.new

    def allocation_handle(self, disk: str) -> MemoryExport:
        return MemoryExport(self.frozen[disk])

    def close(self) -> None:
        self.vm.log.append("close")

    def commit(self) -> None:
        self.vm.log.append(("commit", self.vm.stored_bitmap()))
        if self.since:
            self.vm.bitmaps.pop(self.since, None)

    def abort(self) -> None:
        self.vm.log.append("abort")
        if self.since:            # fold the new bitmap back: nothing since ``since`` is lost
            self.vm.bitmaps[self.since].update(self.vm.bitmaps.pop(self.new))
            self.vm.recording = self.since
        else:
            self.vm.bitmaps.pop(self.new, None)


class ComparePoint(ChangePoint):
    """A resync's point (tracking.scan.ScanPoint's part): the blocks whose digest differs
    from the replica's, counting the bytes compared."""

    def __init__(self, session: Session, disks: list[str], new: str, remote: dict):
        super().__init__(session, disks, None, new)
        self.remote = remote
        self.compared = 0
        self.plan = []

    def chunks(self):
        for disk in self.disks:
            ours = digests(self.frozen[disk])
            for i in range(SIZE // K64):
                self.compared += K64
                d = scan.DIGEST
                if ours[i * d:(i + 1) * d] != self.remote[disk][i * d:(i + 1) * d]:
                    self.plan.append((disk, i * K64, K64, ex.DATA))
                    yield Chunk(disk, ex.DATA, i * K64, K64,
                                self.frozen[disk][i * K64:(i + 1) * K64])

    def commit(self) -> None:
        self.vm.log.append(("commit", self.vm.stored_bitmap()))


class MixedPoint(ChangePoint):
    """A delta over both kinds of disk (tracking.mixed.MixedPoint's part): what ``since``
    recorded on the disks that keep a bitmap, the blocks whose digest differs from the
    replica's on the disks in ``remote`` (scan-tracked), with each scanned disk's cost."""

    def __init__(self, session: Session, disks: list[str], since: str | None, new: str,
                 remote: dict):
        # (every disk scanned: no bitmap ``since`` exists to read)
        super().__init__(session, disks, since if set(disks) - set(remote) else None, new)
        self.remote = remote
        self.plan = [p for p in self.plan if p[0] not in remote]
        self.costs = {d: {"read": 0, "compared": 0, "moved": 0} for d in remote}

    def chunks(self):
        yield from super().chunks()
        for disk in self.remote:
            ours = digests(self.frozen[disk])
            cost = self.costs[disk]
            for i in range(SIZE // K64):
                cost["read"] += K64
                cost["compared"] += K64
                d = scan.DIGEST
                if ours[i * d:(i + 1) * d] != self.remote[disk][i * d:(i + 1) * d]:
                    cost["moved"] += K64
                    yield Chunk(disk, ex.DATA, i * K64, K64,
                                self.frozen[disk][i * K64:(i + 1) * K64])


class Tracker:
    """A change tracker (tracking.bitmap.BitmapTracker's interface) over ``VM``."""

    name = "bitmap"

    def prepare(self, session: Session, disks: list[str], since: str, prefix: str) -> None:
        session.vm.log.append(("prepare", since))
        if since not in session.vm.bitmaps:
            raise TrackingError(f"change-tracking bitmap {since} is missing")

    def point(self, session: Session, disks: list[str], since: str | None,
              new: str) -> ChangePoint:
        return ChangePoint(session, disks, since, new)

    def owned(self, session: Session, disks: list[str], prefix: str) -> set[str]:
        return {n for n in session.vm.bitmaps if n.startswith(prefix)}


def digests(data: bytes) -> bytes:
    """The replica's manifest of a disk holding ``data`` (tracking.scan: BLAKE3 per block)."""
    return b"".join(blake3(bytes(data[i:i + scan.BLOCK])).digest(scan.DIGEST)
                    for i in range(0, len(data), scan.BLOCK))


# -- the replica, as the peer client reaches it --------------------------------------------

class Replica:
    """The peer client (transport.client.PeerClient) of the replica: cycle streams are read
    with the real wire reader and applied onto its copy; ``fail`` is raised instead of the
    acknowledgement (after the stream was read: the replica never answered)."""

    def __init__(self, vm: VM):
        self.vm = vm
        self.copy = {d: bytearray(SIZE) for d in DISKS}
        self.requests: list[tuple[str, str]] = []
        self.cycles: list[dict] = []         # each received stream: header, records, trailer
        self.fail: Exception | None = None
        self.ack_cycle: int | None = None    # acknowledge this cycle number instead
        self.block = scan.BLOCK

    def connect_ahead(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def request(self, method: str, path: str, body=None, timeout=None) -> dict:
        self.requests.append((method, path))
        if path.endswith("/cycles"):
            reader = wire.CycleReader(io.BytesIO(b"".join(body)).read)
            records = [(r.kind, DISKS[r.disk], r.offset, r.length, r.payload)
                       for r in reader.records()]
            self.cycles.append({"header": reader.header, "records": records,
                                "trailer": reader.trailer})
            if self.fail is not None:
                raise self.fail
            for _kind, disk, offset, length, payload in records:
                self.copy[disk][offset:offset + length] = payload or bytes(length)
            self.vm.log.append("ack")
            answer = {"cycle": self.ack_cycle or reader.header["cycle"]}
            if reader.header["verify"]:
                answer["manifest"] = {d: scan.encode(digests(self.copy[d])) for d in DISKS}
            return answer
        if "/manifest?" in path:
            asked = parse_qs(urlsplit(path).query).get("disks")
            disks = asked[0].split(",") if asked else DISKS
            return {"block": self.block, "read_bytes": len(disks) * SIZE,
                    "disks": {d: scan.encode(digests(self.copy[d])) for d in disks}}
        if "/state?" in path:
            return {"state": "replicating"}
        raise AssertionError(f"unexpected request {method} {path}")

    def sent(self) -> list[tuple]:
        """The records of the last stream, without payloads."""
        return [r[:4] for r in self.cycles[-1]["records"]]


# -- the host -----------------------------------------------------------------------------

class Host:
    """What run_cycle takes from its host: store, driver, tracker, peer client, lock, events."""

    name = "site-a"

    def __init__(self, store: Store):
        self.store = store
        self.vm = VM()
        self.vm.stored_bitmap = lambda: store.relationship(VM_NAME).bitmap
        self.driver = Driver(self.vm)
        self.replica = Replica(self.vm)
        self._lock = threading.RLock()

    def tracker(self, name: str = "bitmap") -> Tracker:
        assert name == "bitmap"
        return Tracker()

    def client_for_peer(self, peer, timeout: float = 60.0) -> Replica:
        assert peer == "site-b"
        return self.replica

    def vm_lock(self, vm: str):
        return self._lock

    def event(self, kind: str, message: str, vm: str | None = None) -> None:
        self.store.add_event(kind, message, vm)


class Operation:
    """A running operation (service.activity.Operation): its phase, what it measures."""

    def __init__(self, measured: list):
        self.measured = measured
        self.label = self.phase = None

    def measure(self, source, attr: str, total: int, then: str | None = None) -> None:
        self.measured.append((self.phase, attr, total))


class Activity:
    """host.activity (service.activity.Activity): the progress each cycle reports."""

    def __init__(self):
        self.measured: list[tuple[str, str, int]] = []   # (phase, counter, total)

    @contextlib.contextmanager
    def running(self, vm: str, kind: str, label: str):
        yield Operation(self.measured)


@pytest.fixture
def host(tmp_path):
    store = Store(tmp_path / "state.db")
    yield Host(store)
    store.close()


def protect(host: Host, state: str = "replicating", **fields) -> str:
    """A relationship (replicating unless said) at cycle 4: bitmap ``PREFIX4`` records on
    the VM, the replica equal to the disks, no recovery point due; returns that bitmap."""
    since = f"{PREFIX}4"
    row = {"vm": VM_NAME, "id": REL_ID, "role": "primary", "peer": "site-b", "state": state,
           "disks": DISKS, "cycle": 4, "bitmap": since, "last_point_at": time.time()}
    row.update(fields)
    host.store.add_relationship(Relationship(**row))
    if row["bitmap"]:
        host.vm.bitmaps[row["bitmap"]] = {}
        host.vm.recording = row["bitmap"]
    return since


def events(host: Host, kind: str) -> list[str]:
    return [e["message"] for e in host.store.events(VM_NAME) if e["kind"] == kind]


def noise(seed: int, n: int = K64) -> bytes:
    return blake3(bytes([seed])).digest(n)


# -- a delta ships what the tracking recorded, no more, no less ------------------------------

def test_a_delta_ships_exactly_the_extents_the_tracking_point_recorded(host):
    since = protect(host)
    host.vm.write("disk0", 0, noise(1))
    host.vm.write("disk0", 3 * K64, bytes(K64))        # data that reads as zeros
    host.vm.trim("disk1", 8 * K64, 2 * K64)
    stats = run_cycle(host, VM_NAME)
    assert ("prepare", since) in host.vm.log
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 0, K64),
                                   (wire.Kind.ZERO, "disk0", 3 * K64, K64),
                                   (wire.Kind.TRIM, "disk1", 8 * K64, 2 * K64)]
    assert host.replica.cycles[-1]["records"][0][4] == noise(1)
    header = host.replica.cycles[-1]["header"]
    assert (header["cycle"], header["epoch"], header["disks"], header["initial"],
            header["resync"]) == (5, 1, DISKS, False, False)
    assert host.replica.copy == host.vm.content
    assert (stats["raw_bytes"], stats["zero_bytes"]) == (K64, 3 * K64)
    rel = host.store.relationship(VM_NAME)
    assert (rel.cycle, rel.bitmap, rel.consecutive_failures) == (5, f"{PREFIX}5", 0)
    assert set(host.vm.bitmaps) == {f"{PREFIX}5"}     # the old point released


def test_the_old_point_is_released_only_after_the_ack_and_the_new_point_is_recorded(host):
    since = protect(host)
    host.vm.write("disk1", K64, noise(2))
    run_cycle(host, VM_NAME)
    log = host.vm.log
    # The commit (which releases ``since``) comes once, after the replica's ack, and by
    # then the store already names the new bitmap: a crash in between loses no write.
    commits = [e for e in log if isinstance(e, tuple) and e[0] == "commit"]
    assert commits == [("commit", f"{PREFIX}5")]
    assert log.index(commits[0]) > log.index("ack")
    assert since not in host.vm.bitmaps


def test_a_delta_compares_a_scan_tracked_disk_with_the_replica_and_ships_what_differs(
        host, monkeypatch):
    """A disk that holds no bitmap (a raw file or a block device of a libvirt domain):
    the cycle asks the replica's index for that disk's digests only, checks the tracking
    point on the other disks only, and ships the blocks whose digests differ."""
    since = protect(host)
    monkeypatch.setattr(mixed, "MixedPoint", MixedPoint)   # run_cycle imports it per cycle
    host.driver.tracking["disk1"] = "scan"
    host.vm.write("disk0", 0, noise(1))
    host.vm.content["disk1"][5 * K64:6 * K64] = noise(2)     # no bitmap sees it
    stats = run_cycle(host, VM_NAME)
    assert host.replica.requests[0] == (
        "GET", f"/v1/replica/relationships/{VM_NAME}/manifest?epoch=1&disks=disk1")
    assert ("prepare", since) in host.vm.log
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 0, K64),
                                   (wire.Kind.DATA, "disk1", 5 * K64, K64)]
    assert host.replica.copy == host.vm.content
    assert stats["scanned"] == {"disk1": {"read": SIZE, "compared": SIZE, "moved": K64}}
    rel = host.store.relationship(VM_NAME)
    assert rel.disk_tracking == {"disk0": "bitmap", "disk1": "scan"}
    assert rel.scan_costs["disk1"]["read"] == SIZE and rel.scan_costs["disk1"]["moved"] == K64
    assert rel.bitmap == f"{PREFIX}5" and since not in host.vm.bitmaps

    # Nothing changed: the scan reads the disk again and moves nothing.
    host.replica.requests.clear()
    stats = run_cycle(host, VM_NAME)
    assert host.replica.sent() == [] and stats["raw_bytes"] == 0
    assert host.store.relationship(VM_NAME).scan_costs["disk1"]["moved"] == 0


def test_a_delta_of_disks_that_all_hold_no_bitmap_checks_no_tracking_point(host, monkeypatch):
    protect(host, bitmap=f"{PREFIX}4")
    monkeypatch.setattr(mixed, "MixedPoint", MixedPoint)
    host.driver.tracking = {d: "scan" for d in DISKS}
    del host.vm.bitmaps[f"{PREFIX}4"]        # no bitmap exists on scan-tracked disks
    host.vm.content["disk0"][0:K64] = noise(3)
    run_cycle(host, VM_NAME)
    assert not any(isinstance(e, tuple) and e[0] == "prepare" for e in host.vm.log)
    assert ("GET", f"/v1/replica/relationships/{VM_NAME}/manifest?epoch=1&disks=disk0%2Cdisk1") \
        in host.replica.requests
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 0, K64)]
    assert host.store.relationship(VM_NAME).state == "replicating"


def test_a_delta_of_bitmap_tracked_disks_asks_the_replica_for_no_digests(host):
    protect(host)
    host.vm.write("disk0", 0, noise(4))
    stats = run_cycle(host, VM_NAME)
    assert not any("/manifest" in p for _, p in host.replica.requests)
    assert stats["scanned"] == {} and host.store.relationship(VM_NAME).scan_costs == {}


# -- a failed send keeps everything for the next cycle ----------------------------------------

def test_a_cycle_whose_send_fails_keeps_the_tracking_so_the_next_one_resends(host):
    since = protect(host)
    host.vm.write("disk0", 2 * K64, noise(3))
    host.replica.fail = Unreachable("connection to site-b was cut")
    with pytest.raises(Unreachable):
        run_cycle(host, VM_NAME)
    assert "abort" in host.vm.log and not any(e[0] == "commit" for e in host.vm.log
                                              if isinstance(e, tuple))
    rel = host.store.relationship(VM_NAME)
    assert (rel.cycle, rel.bitmap, rel.state) == (4, since, "replicating")
    assert rel.consecutive_failures == 1 and "was cut" in rel.last_error
    assert set(host.vm.bitmaps) == {since}          # the new bitmap folded back
    assert [c.ok for c in host.store.cycles(VM_NAME)] == [0]
    assert ("GET", f"/v1/replica/relationships/{VM_NAME}/state?epoch=1") not in \
        host.replica.requests                       # unreachable: not asked again

    host.vm.write("disk1", 5 * K64, noise(4))       # written after the failed cycle
    host.replica.fail = None
    run_cycle(host, VM_NAME)
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 2 * K64, K64),
                                   (wire.Kind.DATA, "disk1", 5 * K64, K64)]
    assert host.replica.copy == host.vm.content
    rel = host.store.relationship(VM_NAME)
    assert (rel.cycle, rel.bitmap, rel.consecutive_failures) == (5, f"{PREFIX}5", 0)


def test_an_ack_of_another_cycle_is_no_ack(host):
    since = protect(host)
    host.vm.write("disk0", 0, noise(5))
    host.replica.ack_cycle = 4
    with pytest.raises(OperationError, match="acknowledged cycle 4, expected 5"):
        run_cycle(host, VM_NAME)
    assert "abort" in host.vm.log
    assert host.store.relationship(VM_NAME).bitmap == since
    assert set(host.vm.bitmaps) == {since}


def test_a_replica_that_took_over_fences_this_copy(host):
    since = protect(host)
    host.vm.write("disk0", 0, noise(6))
    host.replica.fail = Superseded("site-b is the primary of web1 (epoch 2)")
    with pytest.raises(Superseded):
        run_cycle(host, VM_NAME)
    rel = host.store.relationship(VM_NAME)
    assert rel.state == "error" and rel.fenced.startswith("site-b has become the primary")
    assert host.driver.stopped == [(VM_NAME, True)]   # powered off at once
    assert rel.bitmap == since and "abort" in host.vm.log
    assert events(host, "fence")


# -- broken or overflowing tracking: a resync, never "clean" ---------------------------------

def test_a_delta_without_a_tracking_point_is_refused_and_needs_a_resync(host):
    protect(host, bitmap=None)
    host.vm.write("disk0", 0, noise(7))
    with pytest.raises(TrackingError, match="no change-tracking point"):
        run_cycle(host, VM_NAME)
    rel = host.store.relationship(VM_NAME)
    assert rel.state == "resync_required" and rel.resync_reason
    assert "session" not in host.vm.log and host.replica.cycles == []
    assert events(host, "state") == [
        "replicating -> resync_required: web1 has no change-tracking point"]
    assert events(host, "tracking")


def test_pending_changes_over_the_bound_need_a_resync_and_ship_nothing(host):
    since = protect(host, pending_bound=0.05)       # 5 % of 2 MiB: 104857 bytes
    host.vm.write("disk0", 0, noise(8, 2 * K64))        # 128 KiB pending
    with pytest.raises(TrackingError, match="over the bound"):
        run_cycle(host, VM_NAME)
    assert host.replica.cycles == []
    assert "abort" in host.vm.log and set(host.vm.bitmaps) == {since}
    assert host.store.relationship(VM_NAME).state == "resync_required"


# -- the initial copy and the resync start tracking afresh -----------------------------------

def test_the_initial_copy_ships_the_allocated_data_and_drops_older_tracking(host):
    protect(host, state="initial_in_progress", cycle=-1, bitmap=None)
    host.vm.bitmaps[f"{PREFIX}2"] = {}                   # left by an earlier attempt
    host.vm.bitmaps["vmreplica-fedcba98-3"] = {}         # another relationship's
    host.vm.write("disk0", 0, noise(9))
    host.vm.write("disk1", 15 * K64, noise(10))
    run_cycle(host, VM_NAME, mode="initial")
    assert not any(isinstance(e, tuple) and e[0] == "prepare" for e in host.vm.log)
    assert ("freeze", None, f"{PREFIX}0") in host.vm.log
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 0, K64),
                                   (wire.Kind.DATA, "disk1", 15 * K64, K64)]
    assert host.replica.cycles[-1]["header"]["initial"] is True
    assert host.store.relationship(VM_NAME).bitmap == f"{PREFIX}0"
    assert set(host.vm.bitmaps) == {f"{PREFIX}0", "vmreplica-fedcba98-3"}


def test_a_resync_ships_the_blocks_whose_digests_differ_whatever_the_bitmaps_say(host, monkeypatch):
    since = protect(host, state="resynchronizing")
    host.vm.bitmaps[f"{PREFIX}3"] = {}                  # a leftover: superseded too
    for d in DISKS:
        host.vm.content[d][:] = noise(11 if d == "disk0" else 12, SIZE)
    host.replica.copy = {d: bytearray(host.vm.content[d]) for d in DISKS}
    host.replica.copy["disk0"][2 * K64:3 * K64] = bytes(K64)
    host.replica.copy["disk1"][9 * K64] ^= 1
    theirs = {d: digests(host.replica.copy[d]) for d in DISKS}
    got: dict = {}

    def compare(session, disks, new, remote):
        got["remote"] = remote
        return ComparePoint(session, disks, new, remote)
    monkeypatch.setattr(scan, "ScanPoint", compare)     # run_cycle imports it per cycle
    stats = run_cycle(host, VM_NAME, mode="resync")
    assert ("GET", f"/v1/replica/relationships/{VM_NAME}/manifest?epoch=1") in \
        host.replica.requests
    assert got["remote"] == theirs              # the replica's digests, decoded
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 2 * K64, K64),
                                   (wire.Kind.DATA, "disk1", 9 * K64, K64)]
    assert host.replica.copy == host.vm.content
    assert host.replica.cycles[-1]["header"]["resync"] is True
    assert stats["compared_bytes"] == 2 * SIZE and stats["replica_read_bytes"] == 2 * SIZE
    assert host.store.relationship(VM_NAME).bitmap == f"{PREFIX}5"
    assert set(host.vm.bitmaps) == {f"{PREFIX}5"}      # since and the leftover dropped
    assert since not in host.vm.bitmaps


def test_a_resync_needs_no_trustworthy_tracking_point(host, monkeypatch):
    since = protect(host, state="resynchronizing")
    del host.vm.bitmaps[since]                  # lost (why it resynchronizes): the
    host.vm.recording = None                    # writes since went unrecorded
    host.vm.write("disk1", 0, noise(20))
    monkeypatch.setattr(scan, "ScanPoint", ComparePoint)
    run_cycle(host, VM_NAME, mode="resync")
    assert not any(isinstance(e, tuple) and e[0] == "prepare" for e in host.vm.log)
    assert ("freeze", None, f"{PREFIX}5") in host.vm.log
    assert host.replica.sent() == [(wire.Kind.DATA, "disk1", 0, K64)]
    assert host.store.relationship(VM_NAME).bitmap == f"{PREFIX}5"


def test_a_resync_refuses_a_replica_that_hashes_other_blocks(host, monkeypatch):
    protect(host, state="resynchronizing")
    host.replica.block = scan.BLOCK * 2
    monkeypatch.setattr(scan, "ScanPoint", ComparePoint)
    with pytest.raises(OperationError, match="hashes blocks of"):
        run_cycle(host, VM_NAME, mode="resync")
    assert "session" not in host.vm.log and host.replica.cycles == []


def test_progress_counts_bytes_read_for_a_change_point_and_bytes_compared_for_digests(host, monkeypatch):
    protect(host)
    host.activity = Activity()       # type: ignore[attr-defined]
    host.vm.write("disk0", 0, noise(13, 3 * K64))
    host.vm.trim("disk1", 0, K64)
    stats = run_cycle(host, VM_NAME)
    assert host.activity.measured == [("reading and shipping", "read_bytes", 3 * K64)]
    assert stats["compared_bytes"] is None
    monkeypatch.setattr(scan, "ScanPoint", ComparePoint)
    stats = run_cycle(host, VM_NAME, mode="resync")
    assert host.activity.measured[-1] == (
        "comparing block digests and shipping the blocks that differ", "compared", 2 * SIZE)
    assert stats["compared_bytes"] == 2 * SIZE


# -- verification ------------------------------------------------------------------------

def test_a_verified_cycle_that_matches_stays_replicating(host):
    protect(host)
    host.vm.write("disk0", 4 * K64, noise(14))
    stats = run_cycle(host, VM_NAME, verify=True)
    assert stats["verified"] is True
    assert host.replica.cycles[-1]["header"]["verify"] is True
    assert host.store.relationship(VM_NAME).state == "replicating"


def test_a_verification_failure_requires_a_resync_through_the_state_machine(host):
    protect(host)
    host.replica.copy["disk1"][7 * K64] = 0xFF            # the replica differs there
    host.vm.write("disk0", 4 * K64, noise(15))
    with pytest.raises(IntegrityError, match=r"differs from the frozen point in 1 block\(s\) "
                                             r"\(disk1@448KiB\)"):
        run_cycle(host, VM_NAME, verify=True)
    rel = host.store.relationship(VM_NAME)
    assert rel.state == "resync_required"
    assert events(host, "state") == ["replicating -> resync_required: verification failed"]
    assert rel.cycle == 5                # the replica has the cycle: it stays acknowledged


# -- recovery points ride on cycles ----------------------------------------------------------

def test_a_cycle_carries_a_recovery_point_only_when_one_is_due(host):
    protect(host)
    host.vm.write("disk0", 0, noise(16))
    run_cycle(host, VM_NAME)
    assert host.replica.cycles[-1]["trailer"]["point"] is None
    host.store.update_relationship(VM_NAME, last_point_at=time.time() - 3601)
    host.vm.write("disk0", 0, noise(17))
    run_cycle(host, VM_NAME)
    assert host.replica.cycles[-1]["trailer"]["point"] == "crash"
    assert host.store.relationship(VM_NAME).points_made == 1


def test_an_app_consistent_point_freezes_the_guest_or_falls_back_to_crash(host):
    protect(host, last_point_at=None, app_every=1)
    run_cycle(host, VM_NAME)
    assert host.replica.cycles[-1]["trailer"]["point"] == "app"
    assert host.vm.log.index("fsthaw") > host.vm.log.index("fsfreeze")
    host.store.update_relationship(VM_NAME, last_point_at=None)
    host.vm.agent_works = False
    run_cycle(host, VM_NAME)
    assert host.replica.cycles[-1]["trailer"]["point"] == "crash"
    assert any("did not freeze" in m for m in events(host, "point"))


# -- states that run no cycle ------------------------------------------------------------

@pytest.mark.parametrize("state", ["suspended", "ready_for_initial", "resync_required"])
def test_sync_refuses_a_relationship_whose_state_runs_no_cycles(host, state):
    protect(host, state=state)
    with pytest.raises(Conflict, match=f"cannot sync in state {state}"):
        operations.sync(host, VM_NAME)
    assert host.vm.log == [] and host.store.cycles(VM_NAME) == []


def test_sync_of_a_relationship_in_error_runs_and_brings_it_back(host):
    protect(host, state="error")
    host.vm.write("disk0", 0, noise(18))
    operations.sync(host, VM_NAME)
    assert host.replica.sent() == [(wire.Kind.DATA, "disk0", 0, K64)]
    assert host.store.relationship(VM_NAME).state == State.REPLICATING.value


def test_the_scheduler_starts_cycles_of_replicating_relationships_only(host):
    protect(host, state="suspended", last_attempt_at=None)
    scheduler = Scheduler(host)
    assert scheduler.run_due(time.time()) == []
    host.store.set_state(VM_NAME, "replicating")
    host.vm.write("disk0", 0, noise(19))
    assert scheduler.run_due(time.time()) == [VM_NAME]
    for t in threading.enumerate():
        if t.name == f"cycle-{VM_NAME}":
            t.join(5)
    assert host.store.relationship(VM_NAME).cycle == 5
