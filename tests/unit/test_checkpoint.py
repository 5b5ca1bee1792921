"""The checkpoint after a delta's ack (replica.checkpoint): the staged cycle is kept
until the heads and the index are synced, which happens by itself after the delay, or
first thing when anything takes the VM's lock; a sync that fails is a crash: the stage is
kept and applied again, never the sync retried (replica.unapplied)."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from vmreplica.domain.relationship import Relationship
from vmreplica.qemutools import img
from vmreplica.replica import checkpoint
from vmreplica.service.host import VMLock
from vmreplica.service.store import Store


class _Host:
    """What the checkpoint and the VM lock use of a host, with a real state store."""

    name = "site-b"

    def __init__(self, path):
        self.store = Store(path / "state.db")
        self.unsynced: dict = {}
        self.unapplied: set = set()
        self._locks: dict = {}
        self.events: list = []
        self.store.add_relationship(Relationship(vm="v1", id="r1", role="replica",
                                                 peer="site-a", state="replicating",
                                                 epoch=1, storage=str(path)))

    def event(self, kind, message, vm=None):
        self.events.append((kind, message, vm))

    def lock_key(self, vm: str) -> str:
        return vm.split("@")[0]

    def vm_lock(self, vm: str) -> VMLock:
        key = self.lock_key(vm)
        return self._locks.setdefault(key, VMLock(self, key))


def _staged_cycle(host, tmp_path, vm="v1", cycle=3):
    head = tmp_path / f"{vm}-head.qcow2"
    index = tmp_path / f"{vm}.index"
    stage = tmp_path / f"{vm}-cycle-{cycle}.stage"
    for f in (head, index, stage):
        f.write_bytes(b"x" * 4096)
    host.store.add_staged(vm, cycle, str(stage))
    return head, index, stage


def test_taking_the_vm_lock_finishes_the_checkpoint_first(tmp_path, monkeypatch):
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "600")
    host = _Host(tmp_path)
    head, index, stage = _staged_cycle(host, tmp_path)
    synced = []
    real = img.sync_files
    monkeypatch.setattr(img, "sync_files", lambda *paths: (synced.extend(paths),
                                                           real(*paths)))
    with host.vm_lock("v1"):
        checkpoint.defer(host, "v1", 3, stage, [str(head)], [str(index)])
    # Acknowledged, not yet synced: the staged copy is what a crash re-applies.
    assert stage.exists() and [r["cycle"] for r in host.store.staged("v1")] == [3]
    assert synced == []
    with host.vm_lock("v1@dr"):             # any relationship of the VM: the same lock
        assert synced == [str(head), str(index)]
        assert not stage.exists() and host.store.staged("v1") == []
        assert host.unsynced == {}
    with host.vm_lock("v1"):                # nothing left to do
        assert synced == [str(head), str(index)]


def test_the_checkpoint_runs_by_itself_after_the_delay(tmp_path, monkeypatch):
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "0.05")
    host = _Host(tmp_path)
    head, index, stage = _staged_cycle(host, tmp_path)
    with host.vm_lock("v1"):
        checkpoint.defer(host, "v1", 3, stage, [str(head)], [str(index)])
        time.sleep(0.2)                      # the timer waits for the lock...
        assert stage.exists()
    deadline = time.monotonic() + 10        # ...and takes it once it is free
    while stage.exists():
        assert time.monotonic() < deadline, "the checkpoint did not run"
        time.sleep(0.01)
    assert host.store.staged("v1") == [] and host.unsynced == {}


def test_a_failed_sync_is_a_crash_redone_from_the_stage_never_retried(tmp_path, monkeypatch):
    """After Linux reports a failed writeback once, the failed pages are marked clean and
    the next fdatasync returns 0 with the old data on the disk: a retried sync proves
    nothing. The stage stays, the VM is marked unapplied (health critical), and the next
    taker of the lock applies the staged cycles again (recovery.redo_unapplied)."""
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "600")
    host = _Host(tmp_path)
    head, _index, stage = _staged_cycle(host, tmp_path)
    with host.vm_lock("v1"):
        checkpoint.defer(host, "v1", 3, stage, [str(head)], [])
    calls = []

    def broken(*paths):
        calls.append(paths)
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(img, "sync_files", broken)
    from vmreplica.replica import recovery
    redone = []

    def redo(h, vm, at_start=False):
        redone.append(vm)
        raise OSError(errno.EIO, "Input/output error")      # the disk still fails
    monkeypatch.setattr(recovery, "redo_unapplied", redo)
    with pytest.raises(Exception, match="could not be applied.*Input/output error"):
        with host.vm_lock("v1"):
            pass
    assert len(calls) == 1 and redone == ["v1"]          # synced once, then a redo
    assert stage.exists() and [r["cycle"] for r in host.store.staged("v1")] == [3]
    assert host.unsynced == {} and host.unapplied == {"v1"}
    pending = host.store.relationship("v1").apply_pending
    assert pending["cycle"] == 3 and "Input/output error" in pending["error"]
    from vmreplica.domain.health import assess
    health = assess(host.store.relationship("v1"), time.time())
    assert health.level == "critical" and "Input/output error" in health.reasons[0]
    # The lock was released; the next taker redoes again, never syncs again.
    def fixed(h, vm, at_start=False):
        redone.append(vm)
        from vmreplica.replica import unapplied
        unapplied.clear(h, vm, [3])
        return [3]
    monkeypatch.setattr(recovery, "redo_unapplied", fixed)
    took = []
    t = threading.Thread(target=lambda: took.append(host.vm_lock("v1").acquire(timeout=5)))
    t.start()
    t.join()
    assert took == [True] and len(calls) == 1 and redone == ["v1", "v1"]
    assert host.unapplied == set() and not host.store.relationship("v1").apply_pending


def test_a_lock_taken_as_is_does_not_wait_for_the_redo(tmp_path, monkeypatch):
    """Removal, an initial copy and a resync rewrite or drop the heads: they take the
    lock without the redo of a cycle that cannot be applied."""
    host = _Host(tmp_path)
    host.unapplied.add("v1")
    from vmreplica.replica import recovery
    monkeypatch.setattr(recovery, "redo_unapplied",
                        lambda *a, **k: pytest.fail("redo attempted"))
    with host.vm_lock("v1").as_is():
        pass


def test_a_file_deleted_since_is_skipped_any_other_error_is_raised(tmp_path):
    f = tmp_path / "kept"
    f.write_bytes(b"y")
    img.sync_files(str(tmp_path / "gone"), str(f))   # no error
    with pytest.raises(OSError):
        img.sync_files(str(f / "x"))     # ENOTDIR: not a file that went away


def test_unsynced_commits_are_kept_and_made_durable_by_the_next(tmp_path):
    store = Store(tmp_path / "state.db")
    store.add_staged("v1", 1, "/x")
    with store.unsynced():
        store.remove_staged("v1", 1)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1   # NORMAL
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2       # FULL again
    assert store.staged("v1") == []
    store.close()
    assert Store(tmp_path / "state.db").staged("v1") == []


def test_the_operation_that_deferred_does_not_settle_by_taking_the_lock_again(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "600")
    host = _Host(tmp_path)
    head, _index, stage = _staged_cycle(host, tmp_path)
    with host.vm_lock("v1"):
        checkpoint.defer(host, "v1", 3, stage, [str(head)], [])
        with host.vm_lock("v1"):            # the same thread, within: nothing synced
            assert stage.exists()
        assert stage.exists()
    with host.vm_lock("v1"):
        assert not stage.exists()
