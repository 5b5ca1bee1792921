"""One qemu-storage-daemon for the block sessions of a host's powered-off VMs (issue 20).

A powered-off VM's cycle needs QEMU for its disks' bitmaps (start the new one, stop the
old one, the dirty map over NBD). A storage daemon started for every such cycle cost
the primary more than the cycles themselves at 100 VMs every 30 s (39 % of its CPU
samples: exec, the dynamic loader, page faults). This daemon is started once and kept:
a session adds its VM's images (``blockdev-add``), exports and reads them, and removes
them at its end (``blockdev-del``: QEMU flushes the image and stores its persistent
bitmaps, as a storage daemon's ``quit`` does). Between two cycles no image is open in
it, so a power cut or a kill between cycles finds every image closed with its bitmaps
stored — as with a daemon per cycle; during a cycle it is the same as before too.

Idle (no image open) for ``idle_close`` seconds, it quits; the next session starts it
again. It is started by the one long-lived spawner thread (qemutools.spawn) with a
parent-death signal, so it ends with the vmreplica daemon, and a later daemon's
``reap`` stops one a killed daemon left (its pid file is HOME/run/atrest-PID.qsd.pid).

Its monitor is shared by the sessions of several VMs: one command at a time
(``Images.execute`` holds the lock for one command, never for a whole session).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..errors import HypervisorError
from .qmp import QMPError
from .qsd import QuitTimeout, StorageDaemon

log = logging.getLogger("vmreplica.qsd")

IDLE_CLOSE = 120.0   # seconds with no image open before the daemon quits
LOCK_RETRIES = (0.25, 0.5, 0.75, 1.0)   # waits before asking again for a locked image


class AtRestDaemon:
    def __init__(self, run_dir: Path, idle_close: float = IDLE_CLOSE):
        self.run_dir = Path(run_dir)
        self.idle_close = idle_close
        self._lock = threading.Lock()
        self._qsd: StorageDaemon | None = None
        self._open: dict[str, list[str]] = {}   # owner -> the nodes it added, in order
        self._idle_since = time.monotonic()
        self.started = 0                        # storage daemons started (for tests)

    # -- sessions ------------------------------------------------------------------------
    def attach(self, owner: str, blockdevs: list[dict]) -> Images:
        """Open ``blockdevs`` (in order: a file node before the format node on it) for
        ``owner`` (one VM's session). Nodes an earlier session of the same owner could
        not remove are removed first. An image another process holds locked (a backup
        tool, `qemu-img`, `qemu-io` writing into a powered-off VM's image) is asked for
        again a few times over about 2.5 s before the session fails (the scale benchmark
        met one such conflict in 1,000 cycles)."""
        for attempt in range(len(LOCK_RETRIES) + 1):
            try:
                return self._attach(owner, blockdevs)
            except QMPError as e:
                if "lock" not in e.desc or attempt == len(LOCK_RETRIES):
                    if "lock" in e.desc:
                        files = ", ".join(str(bd["filename"]) for bd in blockdevs
                                          if "filename" in bd)
                        raise HypervisorError(
                            f"a disk image is held by another process ({e.desc}): {files}",
                            hint="a VM started meanwhile, or a tool (qemu-img, qemu-io, a "
                                 "backup) has the image open; the next cycle tries again"
                        ) from None
                    raise
                time.sleep(LOCK_RETRIES[attempt])
        raise AssertionError("unreachable")

    def _attach(self, owner: str, blockdevs: list[dict]) -> Images:
        with self._lock:
            qsd = self._ensure()
            if owner in self._open:
                self._remove(owner)
            added: list[str] = []
            try:
                for bd in blockdevs:
                    self._execute(qsd, "blockdev-add", bd)
                    added.append(bd["node-name"])
            except BaseException:
                self._open[owner] = added
                try:
                    self._remove(owner)
                except HypervisorError as e:
                    log.warning("removing what %s had opened: %s", owner, e)
                raise
            self._open[owner] = added
            assert qsd.nbd_socket is not None         # (started with its NBD server)
            return Images(self, owner, str(qsd.nbd_socket))

    def detach(self, owner: str) -> None:
        """Close ``owner``'s images (flushed, bitmaps stored). Raises QuitTimeout if QEMU
        would not close one: the whole daemon is then stopped, which stores the bitmaps
        of every image it has open (another VM's session fails and is retried)."""
        with self._lock:
            if owner not in self._open:
                return
            try:
                self._remove(owner)
            except HypervisorError as e:
                log.warning("the at-rest storage daemon could not close the images of %s "
                            "(%s): stopping it", owner, e)
                self._stop()
                raise QuitTimeout(f"qemu-storage-daemon could not close the images of "
                                  f"{owner} ({e.message}) and was stopped") from None
            finally:
                if not self._open:
                    self._idle_since = time.monotonic()

    def execute(self, owner: str, command: str, arguments: dict | None = None,
                timeout: float | None = None):
        with self._lock:
            if owner not in self._open or self._qsd is None:
                raise HypervisorError(f"the storage daemon of {owner}'s session is gone")
            return self._execute(self._qsd, command, arguments, timeout)

    # -- upkeep --------------------------------------------------------------------------
    def close_idle(self, now: float | None = None) -> bool:
        """Quit if no image has been open for ``idle_close`` seconds; True if it did."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._qsd is None or self._open or now - self._idle_since < self.idle_close:
                return False
            self._stop()
            return True

    def close(self) -> None:
        """Quit (the daemon stops): images still open are flushed, their bitmaps stored."""
        with self._lock:
            self._stop()

    def sweep_stale(self) -> list[Path]:
        """At daemon start, after ``qsd.reap`` stopped the storage daemons a dead daemon
        left: remove the files of at-rest daemons of other processes (their NBD socket,
        which QEMU leaves behind, their monitor and error files). Returns them."""
        mine = f"atrest-{os.getpid()}."
        gone = []
        for f in self.run_dir.glob("atrest-*"):
            if not f.name.startswith(mine):
                f.unlink(missing_ok=True)
                gone.append(f)
        return gone

    @property
    def pid(self) -> int | None:
        qsd = self._qsd
        return qsd.proc.pid if qsd is not None and qsd.proc is not None else None

    # -- inside the lock -----------------------------------------------------------------
    def _ensure(self) -> StorageDaemon:
        if self._qsd is not None and self._qsd.proc is not None \
                and self._qsd.proc.poll() is None:
            return self._qsd
        if self._qsd is not None:
            log.warning("the at-rest storage daemon (pid %s) is gone: starting another",
                        self.pid)
            self._qsd.kill()
            self._open.clear()
        self._qsd = StorageDaemon(self.run_dir, f"atrest-{os.getpid()}", []).start()
        self.started += 1
        return self._qsd

    def _execute(self, qsd: StorageDaemon, command: str, arguments: dict | None = None,
                 timeout: float | None = None):
        assert qsd.qmp is not None                    # (started)
        try:
            return qsd.qmp.execute(command, arguments, timeout)
        except QMPError:
            raise                                     # QEMU refused: the daemon is fine
        except HypervisorError:
            # The monitor failed (the daemon died or hangs): nothing it had open can be
            # trusted any more; the next session starts another.
            self._stop(kill=True)
            raise
        finally:
            if qsd.qmp is not None:
                qsd.qmp.events.clear()    # (export and job events: nobody waits for them)

    def _remove(self, owner: str) -> None:
        nodes = self._open.get(owner, [])
        while nodes:
            node = nodes[-1]
            assert self._qsd is not None
            try:
                self._execute(self._qsd, "blockdev-del", {"node-name": node})
            except QMPError as e:
                if "not found" not in e.desc.lower() and "cannot find" not in e.desc.lower():
                    raise
            nodes.pop()
        self._open.pop(owner, None)

    def _stop(self, kill: bool = False) -> None:
        qsd, self._qsd = self._qsd, None
        self._open.clear()
        self._idle_since = time.monotonic()
        if qsd is None:
            return
        if kill:
            qsd.kill()
            return
        try:
            qsd.close(timeout=30)
        except HypervisorError as e:
            log.warning("stopping the at-rest storage daemon: %s", e.message)


class Images:
    """One session's images in the at-rest daemon: a monitor for them (``execute``) and
    the daemon's NBD socket, where the session's exports are."""

    def __init__(self, daemon: AtRestDaemon, owner: str, nbd_socket: str):
        self.daemon = daemon
        self.owner = owner
        self.nbd_socket = nbd_socket
        self.path = f"the at-rest storage daemon ({owner})"

    def execute(self, command: str, arguments: dict | None = None,
                timeout: float | None = None):
        return self.daemon.execute(self.owner, command, arguments, timeout)

    def close(self) -> None:
        self.daemon.detach(self.owner)
