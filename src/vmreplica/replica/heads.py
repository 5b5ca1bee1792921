"""Head servers: one qemu-storage-daemon per replicated VM keeps the heads of its chains
open as writable NBD exports between cycles, so a cycle pays for its writes only, not
for starting and stopping a storage daemon. A recovery point closes the server and
freezes the heads with qemu-img (replica.points); continuous mode's mirror target is a
storage daemon of its own (replica.mirror).

A server that is idle for ``IDLE_SECONDS`` is closed (a host may hold many replicas);
the next cycle opens it again. Anything that needs the head files themselves (an
initial copy that recreates them, removal, failover) closes the server first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from ..errors import OperationError
from ..qemutools import img, nbdio
from ..qemutools.qsd import StorageDaemon, io_uring_works, qcow2_node

log = logging.getLogger("vmreplica.replica")

IDLE_SECONDS = 120.0
HEAD_QUIT_SECONDS = 30.0
# Writes in flight per head. Through the page cache, every write takes the head file's
# inode lock: with 16 in flight the storage daemon's 16 I/O threads queued on it, and on
# this two-core machine (TCG guests beside) their spinning on the lock took the CPU
# from the one copying — 64 MiB of scattered 64 KiB writes took 0.20-0.32 s in 4 to 7
# of 7 rounds of bench/bench_libvirt_cycle.py, against 0.034-0.073 s with 4 in flight
# (perf: copy_folio_from_iter_atomic and rwsem_spin_on_owner in the daemon). Alone, 4
# is as fast as 16 (0.05 s). O_DIRECT writes (an initial copy, a resync) wait on the
# disk instead, not on the lock: they keep 16.
DEPTH_BUFFERED = 4
DEPTH_DIRECT = nbdio.IN_FLIGHT


def _short(vm: str) -> str:
    return hashlib.sha1(vm.encode()).hexdigest()[:8]


def direct_io_works(path: str) -> bool:
    """Whether ``path``'s file system takes O_DIRECT (most do; tmpfs before Linux 6.6,
    some FUSE and network file systems do not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def write_log_stem(head: str | Path) -> str:
    """The name a head's write logs start with (see _new_write_log)."""
    return f"{Path(head).parent.name}.{Path(head).name}"


def _new_write_log(head: str) -> str | None:
    """Tests only: with ``VMREPLICA_HEAD_WRITE_LOG`` (a directory) in the daemon's
    environment, every opening of a head logs what qcow2 writes into it (qsd.qcow2_node's
    ``write_log``) to a new file ``<dir>/<disk>.<head's file name>.<n>.log``, n = 1, 2, ...
    (``<disk>``: the head's directory, so that two disks' heads, both ``layer-NNNNNN``,
    do not share a log)."""
    where = os.environ.get("VMREPLICA_HEAD_WRITE_LOG")
    if not where:
        return None
    for n in range(1, 100_000):
        path = Path(where) / f"{write_log_stem(head)}.{n}.log"
        try:
            with open(path, "x"):
                return str(path)
        except FileExistsError:
            continue
    raise OperationError(f"no free write-log name for {head} in {where}")


class HeadServer:
    """A storage daemon with the VM's heads open as writable NBD exports.

    ``direct``: the heads are opened O_DIRECT where the file system allows
    (``cache.direct``, native AIO), for the bulk writes of an initial copy or a resync:
    no copy into the page cache, which was a sixth of both earlier machines' CPU
    (1 GiB: 2.3-2.5 s against 2.8-3.3 s buffered). Otherwise, for delta cycles, through
    the page cache: a cycle's writes are made in memory (64 MiB of scattered 64 KiB
    writes: 0.06-0.10 s against 0.11-0.12 s direct on the issue-2 benchmark's machine)
    and written back together by the apply's flush. Readers of a head through the page cache (a compare, a
    failover) are coherent with either.

    Flushes stay real (no ``cache.no-flush``): qcow2 orders its own metadata writes with
    them (a cluster's data and refcount reach the disk before the L2 entry that maps it,
    a new L2 table before the L1 entry that points at it), so whatever a power cut
    leaves, the head's metadata is consistent and re-applying the staged cycle gives the
    cycle's bytes. Without them a new L2 table could land in a cluster freed earlier and
    still holding old bytes, with the L1 entry on the disk and the table not: 512 MiB of
    the guest disk read as garbage (issue 16, defect 2). The flush at the end of a cycle's
    apply therefore fdatasyncs what qcow2 wrote, before the ack; the checkpoint after the
    ack (replica.checkpoint) syncs the hash index and drops the staged copy."""

    def __init__(self, run_dir: Path, vm: str, heads: list[str], direct: bool = False):
        self.vm, self.heads = vm, list(heads)
        self.direct = direct
        blockdevs, exports = [], []
        for i, head in enumerate(self.heads):
            o_direct = direct and direct_io_works(head)
            blockdevs += qcow2_node(head, f"h{i}", direct=o_direct,
                                    write_log=_new_write_log(head),
                                    aio=None if o_direct or not io_uring_works() else "io_uring")
            exports.append({"type": "nbd", "id": f"e{i}", "node-name": f"h{i}",
                            "name": f"h{i}", "writable": True})
        self.qsd = StorageDaemon(run_dir, f"hd-{_short(vm)}", blockdevs, exports).start()
        self.writers: list[nbdio.Writer] = []
        try:
            assert self.qsd.nbd_socket is not None      # (it has exports)
            for i in range(len(self.heads)):
                h = nbdio.connect(self.qsd.nbd_socket, f"h{i}")
                self.writers.append(nbdio.Writer(h, f"head {i} of {vm}",
                                                 DEPTH_DIRECT if direct else DEPTH_BUFFERED))
        except BaseException:
            self.close()
            raise
        self.last_used = time.monotonic()

    def alive(self) -> bool:
        return self.qsd.proc is not None and self.qsd.proc.poll() is None

    def sync(self) -> None:
        """fdatasync every head: what the server wrote and flushed reaches the disk."""
        img.sync_files(*self.heads)

    def manifest(self, i: int) -> bytes:
        """Block digests of head ``i`` (see tracking.scan)."""
        from ..tracking import scan
        assert self.qsd.nbd_socket is not None          # (it has exports)
        h = nbdio.connect(self.qsd.nbd_socket, f"h{i}", ["base:allocation"])
        try:
            return scan.manifest(h, h.get_size())
        finally:
            nbdio.close(h)
            img.drop_cached_pages(self.heads[i])    # a whole head read: see drop_cached_pages

    def fill_unknown(self, i: int, digests: bytes, blocks: list[int]) -> bytes:
        """``digests`` with the given blocks' digests computed from head ``i``."""
        from ..tracking import scan
        assert self.qsd.nbd_socket is not None          # (it has exports)
        h = nbdio.connect(self.qsd.nbd_socket, f"h{i}")
        try:
            return scan.fill(h, h.get_size(), digests, blocks)
        finally:
            nbdio.close(h)
            img.drop_cached_pages(self.heads[i])

    def drop_cached_pages(self) -> None:
        """After a sync: the heads' pages leave the page cache, off this thread."""
        img.drop_cached_pages_later(*self.heads, name=f"uncache-{self.vm}")

    def close(self) -> None:
        for w in self.writers:
            nbdio.close(w.h)
        self.writers = []
        # Heads hold no bitmaps, and what a cycle wrote is staged durably before it is
        # acknowledged (a kill is a crash the replica recovers from): a quit that hangs
        # is not waited for long, it would hold the VM's lock (a removal, the next cycle).
        self.qsd.close(timeout=HEAD_QUIT_SECONDS)


class HeadServers:
    """The head servers of one host, by VM. Callers hold the VM's lock."""

    def __init__(self, run_dir: Path, idle: float = IDLE_SECONDS):
        self.run_dir = Path(run_dir)
        self.idle = idle
        self._servers: dict[str, HeadServer] = {}
        self._guard = threading.Lock()
        self._vm_locks: dict[str, threading.RLock] = {}

    def _lock(self, vm: str) -> threading.RLock:
        # One storage daemon per VM, ever: two threads opening the same VM's server at
        # once would start two daemons on the same socket paths (one's monitor greeting
        # read by the other's client, which then waits forever).
        with self._guard:
            return self._vm_locks.setdefault(vm, threading.RLock())

    def get(self, vm: str, heads: list[str], direct: bool = False) -> HeadServer:
        """The VM's server, opened on ``heads`` (``direct``: see HeadServer) if it is not
        open on them that way already."""
        with self._lock(vm):
            with self._guard:
                server = self._servers.get(vm)
            if server is not None and (server.heads != list(heads) or not server.alive()
                                       or server.direct != direct):
                self.close(vm)
                server = None
            if server is None:
                server = HeadServer(self.run_dir, vm, heads, direct)
                with self._guard:
                    self._servers[vm] = server
            server.last_used = time.monotonic()
            return server

    def close(self, vm: str) -> None:
        with self._lock(vm):
            with self._guard:
                server = self._servers.pop(vm, None)
            if server is not None:
                try:
                    server.close()
                except OperationError as e:
                    log.warning("closing the head server of %s: %s", vm, e)

    def idle_vms(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self._guard:
            return [vm for vm, s in self._servers.items() if now - s.last_used > self.idle]

    def close_all(self) -> None:
        with self._guard:
            vms = list(self._servers)
        for vm in vms:
            self.close(vm)
