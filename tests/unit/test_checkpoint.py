"""The checkpoint after a delta's ack (replica.checkpoint): the staged cycle is kept
until the heads and the index are synced, which happens by itself after the delay, or
first thing when anything takes the VM's lock; a sync that fails keeps the stage."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from vmreplica.qemutools import img
from vmreplica.replica import checkpoint
from vmreplica.service.host import VMLock
from vmreplica.service.store import Store


class _Host:
    """What the checkpoint and the VM lock use of a host, with a real state store."""

    def __init__(self, path):
        self.store = Store(path / "state.db")
        self.unsynced: dict = {}
        self._locks: dict = {}

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


def test_a_failed_sync_keeps_the_stage_and_frees_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("VMREPLICA_CHECKPOINT_DELAY", "600")
    host = _Host(tmp_path)
    head, index, stage = _staged_cycle(host, tmp_path)
    with host.vm_lock("v1"):
        checkpoint.defer(host, "v1", 3, stage, [str(head)], [])

    def broken(*paths):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(img, "sync_files", broken)
    with pytest.raises(OSError):
        with host.vm_lock("v1"):
            pass
    assert stage.exists() and [r["cycle"] for r in host.store.staged("v1")] == [3]
    # The lock was released: another thread takes it (and retries the checkpoint).
    monkeypatch.setattr(img, "sync_files", lambda *paths: None)
    took = []
    t = threading.Thread(target=lambda: took.append(host.vm_lock("v1").acquire(timeout=5)))
    t.start()
    t.join()
    assert took == [True] and not stage.exists()


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
    head, index, stage = _staged_cycle(host, tmp_path)
    with host.vm_lock("v1"):
        checkpoint.defer(host, "v1", 3, stage, [str(head)], [])
        with host.vm_lock("v1"):            # the same thread, within: nothing synced
            assert stage.exists()
        assert stage.exists()
    with host.vm_lock("v1"):
        assert not stage.exists()
