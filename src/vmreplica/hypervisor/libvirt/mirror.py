"""The libvirt driver's continuous mode: the domain's QEMU mirrors every disk into a
relay that holds the TLS connection to the replica, and the monitor the watchdog and a
planned failover hold (``DomainMonitor``: QMP through libvirt, QEMU's block-job events).

The domain's QEMU runs a write-blocking active mirror (`blockdev-mirror`, `sync: none`,
through qemuMonitorCommand) of every disk into a relay: a qemu-storage-daemon of this
host that holds the TLS connection to the replica's export with this host's pinned
credentials and serves it to QEMU on a unix socket (HOME/run/lv-<uuid8>-mr/). Why not
libvirt's block copy (virDomainBlockCopy with SYNCHRONOUS_WRITES): it always begins with
a full copy of the disk (there is no `sync: none`), so every start, and every return
from `degraded`, would read and send whole disks; and libvirt 9.0's NBD TLS is one
global certificate folder (qemu.conf nbd_tls_x509_cert_dir), which cannot hold one
pinned identity per replica host. The relay passes each write on and answers only when
the replica has answered (no cache), so a guest write is still acknowledged only once it
is on the replica. A replica that hangs is cut by killing the relay: QEMU's connection
to it ends at once, the waiting writes complete, the jobs stop (paused, their own
bitmaps keeping what the replica misses). Once the replica is back a new relay takes the
same socket, QEMU's NBD client reconnects to it at the job's next request, and
`block-job-resume` copies only what changed meanwhile. QEMU's BLOCK_JOB_ERROR events
reach a planned failover through libvirt-qemu's monitor-event API (see DomainMonitor),
as they do on the qemu driver's monitor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

import libvirt
import libvirt_qemu

from ...errors import Conflict, HypervisorError
from ...qemutools import qmpsteps
from ...qemutools.qsd import StorageDaemon, reap
from ..base import QUIET_CANCEL_GUARD
from .block import LibvirtBlockSession
from .connection import LibvirtBase, Passthrough, is_active, lv_error, passthrough, qemu_ids
from .domainxml import VMDef, domain_uuid

log = logging.getLogger("vmreplica.libvirt")


class MirrorPart(LibvirtBase):
    continuous = True

    def __init__(self, home: Path, config: dict):
        super().__init__(home, config)
        self._lock = threading.Lock()
        self._relays: dict[str, StorageDaemon] = {}    # continuous mode: vm → its relay
        self._targets: dict[str, tuple[list[str], dict]] = {}   # vm → (disks, target)

    def watch_monitor(self, name: str) -> DomainMonitor:
        dom, _, _ = self._load(name)
        if not self._active(dom):
            raise Conflict(f"VM {name} is not running")
        return DomainMonitor(dom, name, self.uri)

    # -- the relay ---------------------------------------------------------------------
    def _relay_dir(self, vm: VMDef) -> Path:
        return self.run_dir / f"lv-{domain_uuid(vm.host, vm.uuid)[:8]}-mr"

    def _start_relay(self, name: str, dom: libvirt.virDomain, vm: VMDef, disks: list[str],
                     target: dict) -> StorageDaemon:
        relay_dir = self._relay_dir(vm)
        self._stop_relay(name, relay_dir)
        relay_dir.mkdir(parents=True, exist_ok=True)
        blockdevs = [qmpsteps.replica_export_node(f"r-{d}", d, target) for d in disks]
        exports = [{"type": "nbd", "id": f"e-{d}", "node-name": f"r-{d}", "name": d,
                    "writable": True} for d in disks]
        # SIGKILL when this daemon dies: the relay holds nothing to flush, and a clean
        # exit would wait for QEMU's connection to drain while the guest's writes wait
        # on it; killed, the connection ends, the guest goes on, the jobs pause until
        # the restarted daemon resumes them through a new relay.
        relay = StorageDaemon(relay_dir, "relay", blockdevs, exports, objects=[
            (f"tls-creds-x509,id={qmpsteps.TLS_CREDS},dir={target['tls_dir']},"
             "endpoint=client,verify-peer=on")], death_signal="SIGKILL").start()
        try:
            assert relay.nbd_socket is not None         # (it has exports)
            ids = qemu_ids(dom.XMLDesc(0))
            if ids is not None:
                os.chown(relay_dir, *ids)
                os.chown(relay.nbd_socket, *ids)
            os.chmod(relay_dir, 0o750)
            os.chmod(relay.nbd_socket, 0o660)
        except BaseException:
            relay.kill()
            raise
        with self._lock:
            self._relays[name] = relay
            self._targets[name] = (list(disks), dict(target))
        return relay

    def mirror_relay_socket(self, name: str) -> str | None:
        """Where the watchdog's probe goes: through the relay, like the mirror's writes."""
        relay = self._relays.get(name)
        return str(relay.nbd_socket) if relay is not None and self._relay_alive(name) else None

    def _relay_alive(self, name: str) -> bool:
        relay = self._relays.get(name)
        return relay is not None and relay.proc is not None and relay.proc.poll() is None

    def _cut_relay(self, name: str) -> None:
        relay = self._relays.get(name)
        if relay is not None:
            log.warning("pausing %s to end its mirror waited %.0f s on the replica: the "
                        "relay is cut", name, QUIET_CANCEL_GUARD)
            relay.kill()

    def _stop_relay(self, name: str, relay_dir: Path) -> None:
        with self._lock:
            relay = self._relays.pop(name, None)
        if relay is not None:
            try:
                relay.close(timeout=10)
            except HypervisorError as e:
                log.info("the mirror relay of %s: %s", name, e.message)
        if relay_dir.exists():
            reap(relay_dir)       # one an earlier daemon left (it dies with its daemon)

    # -- the mirror --------------------------------------------------------------------
    def mirror_start(self, name: str, disks: list[str], target: dict) -> None:
        """As the qemu driver's (call it paused, right after a cycle): the relay first,
        then the mirror of each disk into it."""
        dom, _, vm = self._load(name)
        relay = self._start_relay(name, dom, vm, disks, target)
        try:
            with LibvirtBlockSession(self, dom, vm) as session:
                nodes = {d: session._node(d) for d in disks}
            for d in disks:
                passthrough(dom, "blockdev-add", {
                    "driver": "nbd", "node-name": f"vmr-mt-{d}", "export": d,
                    "server": {"type": "unix", "path": str(relay.nbd_socket)},
                    "reconnect-delay": 0, "discard": "unmap"})   # (qmpsteps.MIRROR_DISCARDS)
            for d in disks:
                passthrough(dom, "blockdev-mirror",
                            qmpsteps.active_mirror(d, nodes[d], f"vmr-mt-{d}"))
        except BaseException:
            self.mirror_stop(name, disks)
            raise

    def mirror_status(self, name: str, mon=None) -> dict[str, dict]:
        """{disk: job}; while the relay is gone a job is reported failed even before a
        write finds out (the watchdog's probe goes to the replica, not through it)."""
        dom = mon.dom if mon is not None else self._load(name)[0]
        jobs = qmpsteps.mirror_jobs(passthrough(dom, "query-block-jobs"))
        if not self._relay_alive(name):
            for j in jobs.values():
                j["io-status"] = "failed"
        return jobs

    def mirror_yank(self, mon, disks: list[str]) -> bool:
        """Cut a replica that stopped answering: kill the relay (QEMU's connection to it
        ends, the guest's waiting writes complete, the jobs stop with an error). True:
        the jobs can be resumed through a new relay."""
        relay = self._relays.get(mon.vm)
        if relay is not None:
            relay.kill()
        return True

    def mirror_resume(self, name: str, disks: list[str], target: dict | None = None) -> None:
        """A new relay if the old one is gone (nothing happens while the replica is still
        unreachable: the next attempt tries again), then resume the jobs. ``target``: as
        given to mirror_start (a restarted daemon has only what its store recorded)."""
        dom, _, vm = self._load(name)
        if not self._relay_alive(name):
            known = self._targets.get(name)
            if known is None and target and target.get("tls_dir") and target.get("port"):
                known = (list(disks), target)
            if known is None:
                raise HypervisorError(f"the mirror of {name} has no relay to resume through")
            try:
                self._start_relay(name, dom, vm, *known)
            except HypervisorError as e:
                log.info("the mirror relay of %s cannot start yet: %s", name, e.message)
                return
        qmpsteps.resume_mirror_jobs(Passthrough(dom), disks)

    def mirror_stop(self, name: str, disks: list[str]) -> None:
        dom, _, vm = self._load(name)
        if self._active(dom):
            with self._guest_quiet(name, dom):
                qmpsteps.end_mirror_jobs(
                    Passthrough(dom), disks, lambda d: f"vmr-mt-{d}",
                    # a job stuck on the relay
                    stuck=lambda: self._stop_relay(name, self._relay_dir(vm)))
        self._stop_relay(name, self._relay_dir(vm))
        with self._lock:
            self._targets.pop(name, None)

    @contextlib.contextmanager
    def _guest_quiet(self, name: str, dom: libvirt.virDomain):
        """The guest paused while its mirror jobs end (qmpsteps.quiet_guest); a pause
        held up by a replica that hangs is freed by cutting the relay. A guest without
        mirror jobs, or not running, is left as it is."""
        try:
            jobs = self.mirror_status(name)
            running = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        except (HypervisorError, libvirt.libvirtError):
            jobs, running = {}, False
        if not jobs or not running:
            yield
            return
        with qmpsteps.quiet_guest(
                name, self._pause_mark(name),
                pause=lambda: self._run_state(name, "pause", lambda d: d.suspend()),
                resume=lambda: self._run_state(name, "resume", lambda d: d.resume()),
                guard=contextlib.nullcontext(functools.partial(self._cut_relay, name)),
                guard_seconds=QUIET_CANCEL_GUARD, log=log):
            yield


_event_loop: threading.Thread | None = None
_event_guard = threading.Lock()


def _ensure_event_loop() -> None:
    """libvirt delivers events only to connections opened after an event loop was
    registered; one thread runs it for the process."""
    global _event_loop
    with _event_guard:
        if _event_loop is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop.start()


class DomainMonitor:
    """What the continuous-mode watchdog and a planned failover hold for a libvirt
    domain: QMP through libvirt (in band; a replica that hangs is cut at the relay, not
    with QEMU's out-of-band yank), and QEMU's block-job error events with the domain's
    end, through a connection of its own (libvirt-qemu's monitor-event API)."""

    EVENTS = ("BLOCK_JOB_ERROR",)

    def __init__(self, dom: libvirt.virDomain, vm: str, uri: str):
        self.dom, self.vm = dom, vm
        self.events: list[dict] = []
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        _ensure_event_loop()
        self._conn = None
        try:
            self._conn = libvirt.open(uri)
            d = self._conn.lookupByUUIDString(dom.UUIDString())
            self._ids = [libvirt_qemu.qemuMonitorEventRegister(self._conn, d, name,
                                                               self._on_event, None, 0)
                         for name in self.EVENTS]
            self._lifecycle = self._conn.domainEventRegisterAny(
                d, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        except libvirt.libvirtError as e:
            if self._conn is not None:
                self._conn.close()
            raise HypervisorError(f"libvirt cannot pass the events of {vm} on: "
                                  f"{lv_error(e)}") from None
        if not is_active(d):
            self._stopped.set()

    def _on_event(self, _conn, _dom, event, seconds, micros, details, _opaque):
        with self._lock:
            self.events.append({"event": event, "data": json.loads(details) if details else {},
                                "timestamp": {"seconds": seconds, "microseconds": micros}})

    def _on_lifecycle(self, _conn, _dom, event, _detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._stopped.set()

    def execute(self, command: str, arguments: dict | None = None, timeout: float | None = None):
        return passthrough(self.dom, command, arguments)

    def wait_event(self, name: str, timeout: float, match=None) -> dict:
        """Return (and consume) the first event ``name``; HypervisorError once QEMU is
        gone and none is left (as a QMP monitor that closes), or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for i, ev in enumerate(self.events):
                    if ev["event"] == name and (match is None or match(ev)):
                        return self.events.pop(i)
            if self._stopped.is_set():
                raise HypervisorError(f"QEMU of {self.vm} is gone")
            if time.monotonic() >= deadline:
                raise HypervisorError(f"QEMU did not report {name} within {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        assert self._conn is not None               # (__init__ opened it, or raised)
        try:
            for cb in self._ids:
                libvirt_qemu.qemuMonitorEventDeregister(self._conn, cb)
            self._conn.domainEventDeregisterAny(self._lifecycle)
            self._conn.close()
        except libvirt.libvirtError:
            pass
