"""The replica's intake of a cycle (replica.receiver.receive_cycle): what it refuses, what
it stages, applies and acknowledges, and what a full storage leaves behind, decided
against small fakes: a real state store on a temporary SQLite file, the real VM lock
(service.host.VMLock, which redoes unapplied cycles), real streams (transport.wire), and
in place of the head servers (one qemu-storage-daemon per VM) heads kept in memory.
No QEMU, no daemon, no network: each test runs in milliseconds."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from blake3 import blake3

from vmreplica.domain.health import assess
from vmreplica.domain.links import vm_name
from vmreplica.domain.relationship import Relationship
from vmreplica.errors import (
    Conflict,
    IntegrityError,
    NotFound,
    Refused,
    StorageFull,
    Superseded,
    TrackingError,
)
from vmreplica.qemutools import img
from vmreplica.replica import index as rindex
from vmreplica.replica import lifecycle, receiver
from vmreplica.replica.applies import Applies
from vmreplica.service.host import VMLock
from vmreplica.service.store import Store
from vmreplica.tracking import scan
from vmreplica.transport import wire

VM, PEER = "v1", {"name": "site-a"}
DISK = 1 << 20                       # each head: 1 MiB, 16 blocks of the hash index
BLOCK = scan.BLOCK
FREEZE = 1000.5                      # the primary's freeze time of the cycle


def _block(n: int) -> bytes:
    """64 KiB that differ from block to block (and compress: zstd is on by default)."""
    return bytes([n]) * 4096 + bytes(range(256)) * 240


# -- fakes -------------------------------------------------------------------------------

class FakeHeads:
    """``host.heads`` (replica.heads.HeadServers): per VM a server whose writers write into
    in-memory heads, which outlive the servers as files do. ``room``: the bytes the
    storage still takes (None: no limit); a write beyond it raises StorageFull, as the
    real writer does on ENOSPC. Records what the intake asked of it."""

    def __init__(self, host):
        self.host = host
        self.disks: dict[str, bytearray] = {}      # head path -> its bytes
        self.room: int | None = None
        self.opened: list[dict] = []               # each get(): what it saw then
        self.closed: list[str] = []
        self.syncs = 0                             # fdatasyncs of a server's heads

    def get(self, vm: str, heads: list[str], direct: bool = False):
        store = self.host.store
        self.opened.append({"vm": vm, "heads": list(heads), "direct": direct,
                            "staged": [r["cycle"] for r in store.staged(vm)],
                            "stage_files": all(os.path.exists(r["path"]) for r in store.staged(vm))})
        for h in heads:
            self.disks.setdefault(h, bytearray(DISK))
        return FakeServer(self, vm, heads)

    def close(self, vm: str) -> None:
        self.closed.append(vm)

    def written(self) -> bool:
        return any(any(d) for d in self.disks.values())


class FakeServer:
    """A head server (replica.heads.HeadServer) as replica.apply uses it."""

    def __init__(self, heads: FakeHeads, vm: str, paths: list[str]):
        self.heads = heads
        self.writers = [FakeWriter(heads, heads.disks[p], f"head {i} of {vm}")
                        for i, p in enumerate(paths)]

    def sync(self) -> None:
        self.heads.syncs += 1

    def drop_cached_pages(self) -> None:
        pass


class FakeWriter:
    """One head's writer (qemutools.nbdio.Writer): ``size``, ``write``, ``zero``, ``flush``."""

    def __init__(self, heads: FakeHeads, data: bytearray, name: str):
        self.heads, self.data, self.name = heads, data, name
        self.size = len(data)

    def write(self, offset: int, payload) -> None:
        if self.heads.room is not None:
            if len(payload) > self.heads.room:
                raise StorageFull(f"writing {self.name}: no space left on the device")
            self.heads.room -= len(payload)
        self.data[offset:offset + len(payload)] = bytes(payload)   # the pool reuses it

    def zero(self, offset: int, length: int, trim: bool = True) -> None:
        self.data[offset:offset + length] = bytes(length)

    def flush(self) -> None:
        pass


class FakeHost:
    """What the intake uses of service.host.Host, with a real state store and VM lock."""

    name = "site-b"

    def __init__(self, tmp_path):
        self.home = SimpleNamespace(staging=tmp_path / "staging")
        self.store = Store(tmp_path / "state.db")
        self.heads = FakeHeads(self)
        self.unsynced: dict = {}
        self.unapplied: set[str] = set()
        self.mirror_targets: dict = {}
        self.applies = Applies()
        self._locks: dict[str, VMLock] = {}

    def event(self, kind: str, message: str, vm: str | None = None) -> None:
        self.store.add_event(kind, message, vm)

    def lock_key(self, vm: str) -> str:
        return vm_name(vm)

    def vm_lock(self, vm: str) -> VMLock:
        key = self.lock_key(vm)
        return self._locks.setdefault(key, VMLock(self, key))


@pytest.fixture
def host(tmp_path, monkeypatch):
    # A delta's checkpoint waits for the next taker of the VM's lock (no timer in a test).
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "600")
    h = FakeHost(tmp_path)
    storage = tmp_path / "storage"
    storage.mkdir()
    h.store.add_relationship(Relationship(
        vm=VM, id="r1", role="replica", peer="site-a", state="replicating", epoch=2,
        storage=str(storage), disks=["d0"],
        chains={"d0": [str(storage / VM / "d0" / "layer-000000.qcow2")]},
        last_applied_cycle=4, index_valid=True))
    yield h
    h.store.close()


def _head(host) -> bytearray:
    rel = host.store.relationship(VM)
    return host.heads.disks.get(rel.chains["d0"][-1], bytearray(DISK))


def _stream(cycle=5, epoch=2, blocks=(0, 1), compression="zstd", trailer=None, **header):
    """A cycle stream: one DATA record of ``_block(n)`` at block n for each n, and the
    parts it is made of (to tamper with)."""
    w = wire.CycleWriter({"vm": VM, "relationship": "r1", "epoch": epoch, "cycle": cycle,
                          "disks": ["d0"], "primary": "site-a", **header}, compression)
    begin = w.begin()
    records = [w.data(0, n * BLOCK, _block(n)) for n in blocks]
    end = w.end({"cycle": cycle, "epoch": epoch, "freeze_time": FREEZE, **(trailer or {})})
    return begin + b"".join(records) + end, SimpleNamespace(begin=begin, records=records,
                                                          end=end)


def _receive(host, data: bytes, peer=PEER, vm=VM, acknowledge=None) -> dict:
    return receiver.receive_cycle(host, peer, vm, io.BytesIO(data), acknowledge)


class Acks:
    """The daemon's early answer (transport.http.Request.answer_now): what was answered,
    and what the replica held at that moment."""

    def __init__(self, host, fail: bool = False):
        self.host, self.fail = host, fail
        self.sent: list[dict] = []
        self.seen: list[dict] = []

    def __call__(self, answer: dict) -> None:
        store = self.host.store
        self.seen.append({"staged": [r["cycle"] for r in store.staged(VM)],
                          "stage_files": all(os.path.exists(r["path"])
                                             for r in store.staged(VM)),
                          "opened": len(self.host.heads.opened),
                          "written": self.host.heads.written(),
                          "applying": not self.host.applies.wait(VM, timeout=0)})
        if self.fail:
            raise BrokenPipeError("the primary is gone")
        self.sent.append(answer)


def _nothing_taken(host, last_applied=4, state="replicating") -> None:
    """A refused cycle left no trace but its failed history row: no head written, nothing
    staged (no row, no file), the relationship as it was, nothing marked unapplied."""
    rel = host.store.relationship(VM)
    assert host.heads.opened == [] and not host.heads.written()
    assert host.store.staged() == []
    assert not host.home.staging.exists() or list(host.home.staging.rglob("*.*")) == []
    assert (rel.last_applied_cycle, rel.state, rel.apply_pending) == (last_applied, state,
                                                                      None)
    assert host.unapplied == set() and host.unsynced == {}
    assert all(c.ok == 0 for c in host.store.cycles(VM))


# -- refusals ----------------------------------------------------------------------------

def test_a_cycle_for_a_vm_this_host_does_not_replicate_is_refused(host):
    data, _ = _stream()
    with pytest.raises(NotFound, match="site-b holds no replica of VM ghost") as e:
        _receive(host, data, vm="ghost")
    assert "enable replication again" in (e.value.hint or "")
    _nothing_taken(host)


def test_a_cycle_from_a_host_that_is_not_the_primary_is_refused(host):
    data, _ = _stream()
    with pytest.raises(Refused, match="replicates v1 from site-a, not from site-c"):
        _receive(host, data, peer={"name": "site-c"})
    _nothing_taken(host)


@pytest.mark.parametrize(("header", "error", "message"), [
    ({"epoch": 1}, Superseded, "epoch 1 is older than site-b's 2"),
    ({"cycle": 3}, Refused, "cycle 3 is older than the last applied cycle 4"),
    ({"relationship": "r0"}, Refused, "belongs to another relationship of v1"),
    ({"disks": ["d0", "d1"]}, IntegrityError, "disk list does not match"),
], ids=["older-epoch", "older-cycle", "other-relationship", "other-disks"])
def test_a_cycle_that_does_not_follow_is_refused(host, header, error, message):
    """The epoch says who is primary (invariant 4); the cycle number, the relationship
    and the disks, that the cycle continues what the replica holds."""
    epoch, cycle = header.pop("epoch", 2), header.pop("cycle", 5)
    data, _ = _stream(cycle=cycle, epoch=epoch, **header)
    with pytest.raises(error, match=message):
        _receive(host, data)
    _nothing_taken(host)


def test_a_replica_that_failed_over_takes_no_cycle(host):
    host.store.set_state(VM, "failover_in_progress")
    data, _ = _stream()
    with pytest.raises(Superseded, match="has taken over VM v1"):
        _receive(host, data)
    _nothing_taken(host, state="failover_in_progress")


def test_a_delta_is_refused_before_the_initial_copy_and_while_a_resync_is_required(host):
    host.store.update_relationship(VM, last_applied_cycle=-1)
    data, _ = _stream(cycle=0)
    with pytest.raises(Refused, match="the initial copy has not been received"):
        _receive(host, data)
    _nothing_taken(host, last_applied=-1)
    host.store.set_state(VM, "resync_required", last_applied_cycle=4,
                         resync_reason="the staged copy of cycle 4 went missing")
    data, _ = _stream()
    with pytest.raises(TrackingError, match="the staged copy of cycle 4 went missing"):
        _receive(host, data)
    _nothing_taken(host, state="resync_required")


def _tampered(kind: str) -> bytes:
    data, p = _stream(blocks=(0, 1, 2), compression="none")
    if kind == "payload":           # one byte of the first record's data flipped
        at = len(p.begin) + wire.FRAME.size + 100
        return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
    if kind == "record":            # a record whose extent is not on a sector boundary
        w = wire.CycleWriter({"vm": VM, "relationship": "r1", "epoch": 2, "cycle": 5,
                              "disks": ["d0"]}, "none")
        return w.begin() + w.data(0, 0, _block(0)) + w.data(0, 100, _block(1)) + \
            w.end({"cycle": 5, "epoch": 2})
    if kind == "reordered":         # every record intact, in another order
        return p.begin + p.records[1] + p.records[0] + p.records[2] + p.end
    if kind == "dropped":
        return p.begin + p.records[0] + p.records[2] + p.end
    if kind == "trailer":           # the end's totals and times changed
        return p.begin + b"".join(p.records) + p.end.replace(b"1000.5", b"1000.6")
    if kind == "truncated":
        return data[:len(data) - 40]
    if kind == "trailing":
        return data + b"\0"
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "message"), [
    ("payload", "record 0 .*checksum mismatch"),
    ("record", "record 1: invalid extent 100"),
    ("reordered", "digest mismatch"),
    ("dropped", "digest mismatch"),
    ("trailer", "digest mismatch"),
    ("truncated", "ended in the middle of the trailer"),
    ("trailing", "goes on after its end"),
])
def test_a_torn_or_tampered_stream_is_refused_and_nothing_is_applied(host, kind, message):
    """Invariants 1 and 2: a delta is verified whole, to its end frame's digest, while it
    is staged; a stream that fails is neither staged nor applied, whatever records of it
    were intact (a dropped or reordered record is caught only at the end)."""
    with pytest.raises(IntegrityError, match=message):
        _receive(host, _tampered(kind))
    _nothing_taken(host)
    (row,) = host.store.cycles(VM)
    assert row.cycle == 5 and row.ok == 0 and row.error


# -- a good cycle --------------------------------------------------------------------------

def test_a_good_cycle_is_staged_then_applied_then_acknowledged(host):
    data, _ = _stream(blocks=(0, 3))
    t0 = time.time()
    answer = _receive(host, data)
    # Acknowledged: the cycle is applied, and said so.
    assert (answer["vm"], answer["cycle"], answer["applied"], answer["records"]) == \
        (VM, 5, True, 2)
    # Staged durably before the heads were opened to apply it (invariant 1).
    (opened,) = host.heads.opened
    assert opened["staged"] == [5] and opened["stage_files"]
    assert opened["direct"] is False       # a delta goes through the page cache
    assert host.heads.syncs == 0           # no sync beyond the flush before the ack
    head = _head(host)
    assert head[:BLOCK] == _block(0) and head[3 * BLOCK:4 * BLOCK] == _block(3)
    assert not any(head[BLOCK:3 * BLOCK]) and not any(head[4 * BLOCK:])
    # The hash index follows the heads: a resync compares against it.
    rel = host.store.relationship(VM)
    index = rindex.read(rindex.path(rel.storage, VM, "d0"))
    digest = scan.DIGEST
    assert index[:digest] == blake3(_block(0)).digest(digest)
    assert index[3 * digest:4 * digest] == blake3(_block(3)).digest(digest)
    # Recorded: applied, the primary's freeze time, the history; the state unchanged.
    assert (rel.last_applied_cycle, rel.last_freeze_at, rel.state) == (5, FREEZE,
                                                                       "replicating")
    assert rel.last_applied_at >= t0 and rel.primary_prepared is None
    (row,) = host.store.cycles(VM)
    assert (row.cycle, row.kind, row.ok, row.extents) == (5, "delta", 1, 2)
    assert [e for e in host.store.events(VM) if e["kind"] == "state"] == []
    # Until its checkpoint the stage is what a crash applies again; the next taker of the
    # VM's lock syncs the heads and drops it.
    (stage,) = host.store.staged(VM)
    assert stage["cycle"] == 5 and (host.home.staging / VM / "cycle-00000005.stage").exists()
    with host.vm_lock(VM):
        assert host.store.staged(VM) == [] and list((host.home.staging / VM).iterdir()) == []


def test_a_plain_delta_is_acknowledged_once_staged_and_applied_after_the_ack(host):
    """Given a way to answer early (the daemon's), a plain delta is acknowledged once it
    is staged durably and before its heads are touched; the apply follows on the same
    thread, under the VM's lock, shown as running (replica.applies) until it is
    recorded. The answer says it was staged, not applied."""
    acks = Acks(host)
    data, _ = _stream(blocks=(0, 3))
    result = _receive(host, data, acknowledge=acks)
    (answer,) = acks.sent
    assert (answer["vm"], answer["cycle"], answer["applied"], answer["records"]) == \
        (VM, 5, False, 2)
    assert acks.seen == [{"staged": [5], "stage_files": True, "opened": 0,
                          "written": False, "applying": True}]
    # Applied right after, whole, and recorded as the plain path records it.
    assert result["applied"] and host.applies.wait(VM, timeout=0)
    head = _head(host)
    assert head[:BLOCK] == _block(0) and head[3 * BLOCK:4 * BLOCK] == _block(3)
    rel = host.store.relationship(VM)
    assert rel.last_applied_cycle == 5
    (row,) = host.store.cycles(VM)
    assert (row.cycle, row.ok, row.extents) == (5, 1, 2)
    assert [r["cycle"] for r in host.store.staged(VM)] == [5]     # until its checkpoint


def test_before_the_ack_the_stage_is_synced_renamed_its_folder_synced_and_its_row_committed(
        host, tmp_path, monkeypatch):
    """An ack before the apply stands on the stage alone: at the moment of the ack its
    bytes were fsynced (as the .part file), the rename made durable by the staging
    folder's fsync, and its row committed (seen from another connection; the store
    commits with synchronous=FULL outside Store.unsynced). The heads are not touched."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    at_ack: list[dict] = []

    def acknowledge(answer: dict) -> None:
        import sqlite3
        db = sqlite3.connect(f"file:{tmp_path / 'state.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT cycle, path FROM staged_cycles").fetchall()
        finally:
            db.close()
        at_ack.append({"synced": list(synced), "rows": rows,
                       "written": host.heads.written()})

    _receive(host, _stream()[0], acknowledge=acknowledge)
    stage = host.home.staging / VM / "cycle-00000005.stage"
    (seen,) = at_ack
    assert [Path(p).name.startswith("incoming-00000005-") and p.endswith(".part")
            for p in seen["synced"][:1]] == [True]
    assert seen["synced"][1:] == [str(stage.parent)]
    assert seen["rows"] == [(5, str(stage))] and seen["written"] is False


@pytest.mark.parametrize("trailer,header", [({"point": "crash"}, {}), ({"final": True}, {}),
                                            ({}, {"verify": True})],
                         ids=["point", "final", "verify"])
def test_a_point_a_final_or_a_verified_cycle_is_applied_before_its_ack(host, trailer, header,
                                                                       monkeypatch):
    """The point freezes the head, the planned failover and the verification read it:
    these cycles are applied (durably) first and answered by the return value."""
    acks = Acks(host)
    applies = []

    def apply_staged(host, vm, cycle, path, records, trailer, header, durable):
        applies.append({"acked": len(acks.sent), "durable": durable})
        return {"records": 1}

    monkeypatch.setattr(receiver, "apply_staged", apply_staged)
    data, _ = _stream(trailer=trailer, **header)
    answer = _receive(host, data, acknowledge=acks)
    assert applies == [{"acked": 0, "durable": True}]
    assert acks.sent == [] and answer["applied"]


def test_a_storage_short_of_room_for_the_apply_applies_before_the_ack(host, monkeypatch):
    """Without room for the cycle's bytes (and qcow2's tables) beside what the heads hold,
    the apply comes first: a storage that fills up fails this cycle at the primary,
    which keeps its changes."""
    free = os.statvfs(host.store.relationship(VM).storage)
    monkeypatch.setattr(receiver, "APPLY_MARGIN", free.f_bavail * free.f_frsize)
    acks = Acks(host)
    data, _ = _stream(blocks=(0,))
    answer = _receive(host, data, acknowledge=acks)
    assert acks.sent == [] and answer["applied"]


def test_a_cycle_too_large_to_keep_in_memory_is_applied_before_the_ack(host, monkeypatch):
    """A catch-up too large to hold is applied from its stage before it is answered: the
    views of a VM wait for an apply after an ack, which is kept short."""
    monkeypatch.setattr(receiver, "KEEP_IN_MEMORY", BLOCK)
    acks = Acks(host)
    data, _ = _stream(blocks=(0, 1, 2))
    answer = _receive(host, data, acknowledge=acks)
    assert acks.sent == [] and answer["applied"]
    head = _head(host)
    assert [head[n * BLOCK:(n + 1) * BLOCK] == _block(n) for n in range(3)] == [True] * 3


def test_an_acknowledgement_that_cannot_be_sent_still_leaves_the_cycle_applied(host):
    """The primary went away as the ack was sent: it keeps its changes and sends them
    again; the staged cycle is applied all the same (applying twice gives the same)."""
    data, _ = _stream(blocks=(2,))
    _receive(host, data, acknowledge=Acks(host, fail=True))
    assert _head(host)[2 * BLOCK:3 * BLOCK] == _block(2)
    assert host.store.relationship(VM).last_applied_cycle == 5
    assert host.applies.wait(VM, timeout=0)


def test_a_failed_apply_after_the_ack_keeps_the_stage_and_nothing_reads_the_heads(
        host, monkeypatch):
    """Acknowledged, then the storage fills: the primary has released its changes, so the
    stage is all there is: it stays, the VM is marked, and the next taker of the lock
    applies it whole once there is room."""
    monkeypatch.setattr(img, "repair", lambda head: {})
    host.heads.room = BLOCK
    acks = Acks(host)
    data, _ = _stream(blocks=(0, 1, 2))
    with pytest.raises(StorageFull, match="is full: cycle 5 is staged but not applied"):
        _receive(host, data, acknowledge=acks)
    assert [a["applied"] for a in acks.sent] == [False]
    assert host.applies.wait(VM, timeout=0) and host.unapplied == {VM}
    assert [r["cycle"] for r in host.store.staged(VM)] == [5]
    assert host.store.relationship(VM).last_applied_cycle == 4
    host.heads.room = None
    with host.vm_lock(VM):
        head = _head(host)
        assert [head[n * BLOCK:(n + 1) * BLOCK] == _block(n) for n in range(3)] == [True] * 3
        assert host.store.relationship(VM).last_applied_cycle == 5


def test_a_view_waits_for_the_apply_of_an_acknowledged_cycle():
    """replica.applies: a view of a VM waits while an acknowledged cycle of it is being
    applied, not for other VMs, and not beyond its bound."""
    import threading
    applies = Applies()
    assert applies.wait(VM, timeout=0) and applies.wait_all(timeout=0)
    release = threading.Event()
    entered = threading.Event()

    def apply():
        with applies.running(VM):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=apply)
    t.start()
    entered.wait(10)
    assert not applies.wait(VM, timeout=0)
    assert not applies.wait(VM, timeout=0.05) and not applies.wait_all(timeout=0.05)
    assert applies.wait("other", timeout=0)
    release.set()
    assert applies.wait(VM, timeout=10) and applies.wait_all(timeout=10)
    t.join()
    assert applies.wait(VM, timeout=0) and applies.wait_all(timeout=0)


def test_a_final_cycle_is_applied_durably_and_allows_a_planned_failover(host):
    data, _ = _stream(trailer={"final": True})
    _receive(host, data)
    rel = host.store.relationship(VM)
    assert rel.primary_prepared["cycle"] == 5
    # Synced before the ack, its stage dropped at once: nothing left for a checkpoint.
    assert host.heads.syncs == 1
    assert host.store.staged(VM) == [] and host.unsynced == {}
    data, _ = _stream(cycle=6)            # the primary runs again: no planned failover
    _receive(host, data)
    assert host.store.relationship(VM).primary_prepared is None


def test_a_resync_moves_the_state_only_through_the_state_machine(host):
    """A resync takes a replica that needs one through resynchronizing to replicating,
    each move checked by domain.states and recorded as a state event (Store.set_state)."""
    host.store.set_state(VM, "resync_required", resync_reason="bitmap lost")
    data, _ = _stream(blocks=(2,), resync=True)
    answer = _receive(host, data)
    assert answer["applied"] and answer["records"] == 1
    assert host.heads.opened[0]["direct"] is True    # bulk writes: O_DIRECT heads
    rel = host.store.relationship(VM)
    assert (rel.state, rel.last_applied_cycle, rel.index_valid) == ("replicating", 5, True)
    assert _head(host)[2 * BLOCK:3 * BLOCK] == _block(2)
    moves = [e["message"] for e in host.store.events(VM) if e["kind"] == "state"]
    assert moves == ["replicating -> resync_required",
                     "resync_required -> resynchronizing",
                     "resynchronizing -> replicating: cycle 5 applied"]


def test_an_initial_copy_the_state_machine_does_not_allow_is_refused_untouched(host):
    """A replica that replicates is not emptied by an initial copy: replicating ->
    waiting_for_initial is not a move of domain.states, so the cycle is refused before
    anything is written."""
    data, _ = _stream(initial=True)
    with pytest.raises(Conflict, match="cannot go from replicating to waiting_for_initial"):
        _receive(host, data)
    _nothing_taken(host)
    assert host.store.relationship(VM).index_valid is True


# -- a full storage --------------------------------------------------------------------------

def test_a_full_storage_keeps_the_cycle_staged_and_nothing_reads_the_heads_until_it_is_applied(
        host, monkeypatch):
    checked = []
    # The redo checks each head with `qemu-img check -r all` first: here, a clean report.
    monkeypatch.setattr(img, "repair", lambda head: checked.append(str(head)) or {})
    host.heads.room = BLOCK                # the first record fits, the second does not
    data, _ = _stream(blocks=(0, 1, 2))
    with pytest.raises(StorageFull, match="is full: cycle 5 is staged but not applied") as e:
        _receive(host, data)
    assert "nothing reads the replica's newest state" in (e.value.hint or "")
    # The heads hold part of the cycle: the stage stays, the VM is marked, with the reason.
    assert _head(host)[:BLOCK] == _block(0) and not any(_head(host)[BLOCK:])
    assert [r["cycle"] for r in host.store.staged(VM)] == [5]
    assert (host.home.staging / VM / "cycle-00000005.stage").exists()
    rel = host.store.relationship(VM)
    assert rel.apply_pending["cycle"] == 5 and rel.apply_pending["code"] == StorageFull.code
    assert "is full" in rel.apply_pending["error"] and host.unapplied == {VM}
    assert rel.last_applied_cycle == 4 and rel.state == "replicating"
    health = assess(rel, time.time())
    assert health.level == "critical" and "is full" in health.reasons[0]
    assert host.store.cycles(VM)[0].ok == 0
    # No recovery point (nor anything else that takes the VM's lock) while it cannot be
    # applied whole: the lock applies it again first, and the storage is still full.
    with pytest.raises(StorageFull, match="is full"):
        lifecycle.point_now(host, PEER, VM, {"epoch": 2})
    assert host.store.points(VM) == [] and host.store.relationship(VM).apply_pending
    assert checked == [rel.chains["d0"][-1]]          # a redo is handled as a crash
    assert host.heads.opened[-1]["direct"] is True    # ...and writes O_DIRECT
    # Room again: the next taker of the lock applies the staged cycle whole.
    host.heads.room = None
    with host.vm_lock(VM):
        rel = host.store.relationship(VM)
        assert rel.apply_pending is None and host.unapplied == set()
        assert rel.last_applied_cycle == 5 and host.store.staged(VM) == []
        head = _head(host)
        assert [head[n * BLOCK:(n + 1) * BLOCK] == _block(n) for n in range(3)] == [True] * 3
    assert any("applied whole" in e["message"] for e in host.store.events(VM))


def test_an_initial_copy_or_resync_supersedes_a_cycle_that_could_not_be_applied(host,
                                                                              monkeypatch):
    """A resync rewrites what differs, whatever the heads hold: it does not wait for the
    staged cycle (it takes the lock as is), and drops it once applied."""
    monkeypatch.setattr(img, "repair", lambda head: pytest.fail("a redo was attempted"))
    host.heads.room = 0
    data, _ = _stream()
    with pytest.raises(StorageFull):
        _receive(host, data)
    host.heads.room = None
    host.store.set_state(VM, "resync_required", resync_reason="storage was full")
    data, _ = _stream(cycle=6, blocks=(1,), resync=True)
    _receive(host, data)
    rel = host.store.relationship(VM)
    assert (rel.state, rel.last_applied_cycle, rel.apply_pending) == ("replicating", 6, None)
    assert host.store.staged(VM) == [] and host.unapplied == set()
    assert list((host.home.staging / VM).glob("*.stage")) == []
