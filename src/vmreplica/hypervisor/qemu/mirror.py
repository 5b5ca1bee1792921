"""The qemu driver's continuous mode: the VM's QEMU mirrors every disk straight into the
replica's TLS export (write-blocking, qemutools.qmpsteps.active_mirror); the watchdog
holds a second, out-of-band capable monitor (``watch_monitor``), through which a replica
that hangs is cut (``yank``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from ...errors import Conflict, HypervisorError
from ...qemutools import qmpsteps
from ...qemutools.qmp import Monitor
from ..base import QUIET_CANCEL_GUARD
from .files import QemuFiles

log = logging.getLogger("vmreplica.qemu")


class MirrorPart(QemuFiles):
    continuous = True

    def watch_monitor(self, name: str) -> Monitor:
        """The second, out-of-band capable monitor: the watchdog's, kept open."""
        desc = self._load(name)
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        return Monitor(self._rt(desc, "qmp2"), timeout=10, connect_timeout=5, oob=True)

    def mirror_start(self, name: str, disks: list[str], target: dict) -> None:
        """Start a write-blocking active mirror of ``disks`` into NBD exports (named after
        the disks) at target['host']:target['port'] over TLS. Call it with the VM paused,
        right after a cycle made the replica equal to the disks (sync: none)."""
        with self.monitor(name, timeout=30) as m:
            m.execute("object-add", {"qom-type": "tls-creds-x509", "id": qmpsteps.TLS_CREDS,
                                     "dir": str(target["tls_dir"]), "endpoint": "client",
                                     "verify-peer": True})
            try:
                for disk in disks:
                    m.execute("blockdev-add",
                              qmpsteps.replica_export_node(f"mt-{disk}", disk, target))
                for disk in disks:
                    m.execute("blockdev-mirror", qmpsteps.active_mirror(disk, disk, f"mt-{disk}"))
            except BaseException:
                self._mirror_teardown(m, disks)
                raise

    def mirror_relay_socket(self, name: str) -> str | None:
        """No relay: the watchdog's probe goes straight to the replica's export."""
        return None

    def mirror_status(self, name: str, mon: Monitor | None = None) -> dict[str, dict]:
        """{disk: job} for the mirror jobs that exist (status, io-status, paused, ...)."""
        if mon is not None:
            jobs = mon.execute("query-block-jobs")
        else:
            with self.monitor(name, timeout=10) as m:
                jobs = m.execute("query-block-jobs")
        return qmpsteps.mirror_jobs(jobs)

    def mirror_yank(self, mon: Monitor, disks: list[str]) -> bool:
        """Cut the NBD connections to a replica that stopped answering, out of band:
        the guest's writes waiting on it complete, the jobs stop with an error. False:
        a yanked job cannot be resumed (a new mirror is started)."""
        mon.execute_oob("yank", {"instances": [{"type": "block-node", "node-name": f"mt-{d}"}
                                               for d in disks]})
        return False

    def mirror_resume(self, name: str, disks: list[str], target: dict | None = None) -> None:
        with self.monitor(name, timeout=10) as m:
            qmpsteps.resume_mirror_jobs(m, disks)

    def mirror_stop(self, name: str, disks: list[str]) -> None:
        desc = self._load(name)
        if not self._pid(desc):
            return
        with self.monitor(name, timeout=30) as m:
            with self._guest_quiet(name, desc, m):
                self._mirror_teardown(m, disks)

    @contextlib.contextmanager
    def _guest_quiet(self, name: str, desc: dict, m: Monitor):
        """The guest paused while its mirror jobs end (qmpsteps.quiet_guest); a pause
        held up by a replica that hangs is freed by yanking the mirror's connections
        (_yank_guard). A guest without mirror jobs, or not running, is left as it is."""
        jobs = [j for j in m.execute("query-block-jobs")
                if j.get("device", "").startswith(qmpsteps.MIRROR_PREFIX)]
        if not jobs or m.execute("query-status").get("status") != "running":
            yield
            return
        nodes = [f"mt-{j['device'][len(qmpsteps.MIRROR_PREFIX):]}" for j in jobs]
        with qmpsteps.quiet_guest(name, self.pause_mark(desc),
                                  pause=lambda: m.execute("stop"),
                                  resume=lambda: m.execute("cont"),
                                  guard=self._yank_guard(name, nodes),
                                  guard_seconds=QUIET_CANCEL_GUARD, log=log):
            yield

    @contextlib.contextmanager
    def _yank_guard(self, name: str,
                    nodes: list[str]) -> Iterator[Callable[[], None] | None]:
        """The out-of-band monitor, open while the guest is being paused (opened first:
        once the main loop drains, a new monitor would not get its greeting); gives the
        cut that yanks the mirror's connections through it, or None without one."""
        try:
            oob = self.watch_monitor(name)
        except (HypervisorError, Conflict, OSError) as e:
            log.warning("no out-of-band monitor to guard the pause of %s: %s", name, e)
            yield None
            return
        try:
            yield lambda: _cut_mirror(name, oob, nodes)
        finally:
            oob.close()

    def _mirror_teardown(self, m: Monitor, disks: list[str]) -> None:
        qmpsteps.end_mirror_jobs(m, disks, lambda d: f"mt-{d}")
        try:
            m.execute("object-del", {"id": qmpsteps.TLS_CREDS})
        except HypervisorError:
            pass


def _cut_mirror(name: str, oob: Monitor, nodes: list[str]) -> None:
    log.warning("pausing %s to end its mirror waited %.0f s on the replica: its "
                "connections are yanked", name, QUIET_CANCEL_GUARD)
    try:
        oob.execute_oob("yank", {"instances": [{"type": "block-node", "node-name": n}
                                               for n in nodes]})
    except (HypervisorError, OSError) as e:
        log.warning("yanking the mirror of %s: %s", name, e)

