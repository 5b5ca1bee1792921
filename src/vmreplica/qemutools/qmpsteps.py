"""The QMP steps both hypervisor drivers run on a VM's QEMU (or on a storage daemon),
written once: continuous mode's mirror (its arguments, the NBD node of the replica's
export, listing, resuming and ending its jobs, the guest held quiet while they end), the
dirty-bitmap actions of a ``transaction``, and the read-only NBD views of a block
session.

A step talks to anything with ``execute(command, arguments)`` (``QMP`` below): a
``qmp.Monitor`` (the qemu driver's monitors, a storage daemon's), or the libvirt driver's
passthrough (``qemuMonitorCommand``). What differs between the drivers (how the guest is
paused, how a replica that hangs is cut) is passed in.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from ..errors import HypervisorError


class QMP(Protocol):
    """Where a step's commands go."""

    def execute(self, command: str, arguments: dict | None = None) -> Any: ...


# -- continuous mode's mirror -------------------------------------------------------------

MIRROR_PREFIX = "mirror-"   # job mirror-DISK
TLS_CREDS = "vmr-mtls"      # the x509 credentials object of the replica's TLS export

# MIRROR_DISCARDS: every node a mirrored discard crosses (the NBD client nodes on the
# VM's QEMU and the libvirt relay, the replica's head nodes) has `discard: unmap`, QEMU's
# default being `ignore`: a discard the mirror forwards (NBD TRIM) then reaches the
# replica's head. QEMU 7.2's mirror filter itself (mirror_top, opened without
# BDRV_O_UNMAP) drops the guest's discards before the disk while a mirror runs: they
# reach neither the primary's disk nor the replica, which stay equal (checked by
# tests/e2e/test_continuous_discard.py, which also sends a TRIM down the mirror's path).


def active_mirror(disk: str, device: str, target: str) -> dict:
    """`blockdev-mirror` arguments of continuous mode: job ``mirror-<disk>`` from node
    ``device`` into ``target``; nothing copied at start (the replica already equals the
    disk), every later guest write acknowledged only once the target has it, and a
    target that fails stops the job instead of the guest."""
    return {"job-id": f"{MIRROR_PREFIX}{disk}", "device": device, "target": target,
            "sync": "none", "copy-mode": "write-blocking",
            "on-target-error": "stop", "on-source-error": "stop",
            "auto-dismiss": True, "auto-finalize": True}


def replica_export_node(node: str, disk: str, target: dict) -> dict:
    """`blockdev-add` arguments of an NBD client node ``node`` opening the replica's
    export of ``disk`` at target['host']:target['port'] over TLS (credentials object
    ``TLS_CREDS``, the replica's name target['tls_hostname']); no reconnection (a replica
    that is gone fails the request), discards passed on (see MIRROR_DISCARDS)."""
    return {"driver": "nbd", "node-name": node, "export": disk,
            "server": {"type": "inet", "host": target["host"], "port": str(target["port"])},
            "tls-creds": TLS_CREDS, "tls-hostname": target["tls_hostname"],
            "reconnect-delay": 0, "discard": "unmap"}


def mirror_jobs(jobs: list[dict]) -> dict[str, dict]:
    """{disk: job} of the mirror jobs among ``query-block-jobs``' answer."""
    return {j["device"][len(MIRROR_PREFIX):]: j for j in jobs
            if j.get("device", "").startswith(MIRROR_PREFIX)}


def resume_mirror_jobs(qmp: QMP, disks: list[str]) -> None:
    """``block-job-resume`` each disk's mirror job (one that is not paused, or gone, is
    left as it is)."""
    for disk in disks:
        try:
            qmp.execute("block-job-resume", {"device": f"{MIRROR_PREFIX}{disk}"})
        except HypervisorError:
            pass


def end_mirror_jobs(qmp: QMP, disks: list[str], target_node: Callable[[str], str],
                    stuck: Callable[[], None] | None = None) -> None:
    """Cancel the mirror jobs of ``disks`` (force: nothing more is copied), wait up to
    15 s for them to go, then delete their target nodes (``target_node(disk)``). Errors
    are passed over: what is already gone is gone. ``stuck`` is called at each look
    once 5 s have gone by with a job still there (the libvirt driver stops its relay,
    which a job may wait on)."""
    for disk in disks:
        try:
            qmp.execute("block-job-cancel", {"device": f"{MIRROR_PREFIX}{disk}",
                                             "force": True})
        except HypervisorError:
            pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            jobs = qmp.execute("query-block-jobs")
        except HypervisorError:
            break
        if not mirror_jobs(jobs):
            break
        if stuck is not None and time.monotonic() > deadline - 10:
            stuck()
        time.sleep(0.05)
    for disk in disks:
        try:
            qmp.execute("blockdev-del", {"node-name": target_node(disk)})
        except HypervisorError:
            pass


@contextlib.contextmanager
def quiet_guest(name: str, mark: Path, pause: Callable[[], object],
                resume: Callable[[], object],
                guard: AbstractContextManager[Callable[[], None] | None],
                guard_seconds: float, log: logging.Logger) -> Iterator[None]:
    """The guest ``name`` paused, its I/O drained, for the body of the ``with`` (mirror
    jobs end in it: see hypervisor.base QUIET_CANCEL). ``mark`` is written while it is
    paused (a daemon that dies meanwhile resumes the guest at its next start).

    ``guard`` is entered around the pause and gives the cut (or None): a pause still
    waiting after ``guard_seconds`` (a guest write held by a replica that hangs) is freed
    by calling it, which cuts the mirror's connections (the waiting writes complete, the
    jobs stop with an error; the tracking bitmap has those writes). A guest that cannot
    be paused (``pause`` raises HypervisorError) has its jobs ended as they are."""
    with guard as cut:
        timer = threading.Timer(guard_seconds, cut) if cut is not None else None
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(name)
        paused = time.monotonic()
        try:
            if timer is not None:
                timer.start()
            pause()
            held = True
        except HypervisorError as e:
            log.warning("ending the mirror of %s without a pause: %s", name, e.message)
            mark.unlink(missing_ok=True)
            held = False
        finally:
            if timer is not None:
                timer.cancel()
                if timer.is_alive():
                    timer.join()            # a cut under way ends before the guard does
    try:
        yield
    finally:
        if held:
            resume()
            mark.unlink(missing_ok=True)
            log.info("%s was paused %.3f s while its mirror jobs ended", name,
                     time.monotonic() - paused)


# -- dirty bitmaps (actions of one `transaction`) -----------------------------------------

def bitmap_add(node: str, name: str, persistent: bool = True,
               disabled: bool = False) -> dict:
    data: dict = {"node": node, "name": name, "persistent": persistent}
    if disabled:
        data["disabled"] = True
    return {"type": "block-dirty-bitmap-add", "data": data}


def bitmap_remove(node: str, name: str) -> dict:
    return {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}


def bitmap_enable(node: str, name: str) -> dict:
    return {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": name}}


def bitmap_disable(node: str, name: str) -> dict:
    return {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}


def bitmap_merge(node: str, target: str, sources: list[str]) -> dict:
    """OR ``sources``' bits into ``target``."""
    return {"type": "block-dirty-bitmap-merge",
            "data": {"node": node, "target": target, "bitmaps": sources}}


def transaction(qmp: QMP, actions: list[dict]) -> None:
    """All ``actions`` atomically, or none (nothing is sent for none)."""
    if actions:
        qmp.execute("transaction", {"actions": actions})


# -- read-only NBD views (a block session's exports) --------------------------------------

EXPORT_PREFIX = "exp-"


def export_view(qmp: QMP, export_id: str, node: str, name: str,
                bitmap: str | None = None) -> None:
    """Export node ``node`` read-only over NBD as ``name`` (id ``export_id``), with
    dirty bitmap ``bitmap`` as its ``qemu:dirty-bitmap:`` context if given."""
    args: dict = {"type": "nbd", "id": export_id, "node-name": node, "name": name,
                  "writable": False}
    if bitmap:
        args["bitmaps"] = [bitmap]
    qmp.execute("block-export-add", args)


def wait_exports_gone(qmp: QMP, timeout: float = 10.0) -> None:
    """Wait until no export of ours (``exp-*``) is left: a deleted export goes once its
    clients have gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            left = qmp.execute("query-block-exports")
        except HypervisorError:
            return
        if not any(e.get("id", "").startswith(EXPORT_PREFIX) for e in left):
            return
        time.sleep(0.01)


def drop_exports(qmp: QMP, exports: list[str], log: logging.Logger) -> None:
    """Delete the NBD exports ``exports`` (a failure is logged on the caller's ``log``:
    the export goes with its daemon) and wait until they are gone."""
    for export in exports:
        try:
            qmp.execute("block-export-del", {"id": export})
        except HypervisorError as e:
            log.warning("removing export %s: %s", export, e)
    if exports:
        wait_exports_gone(qmp)
