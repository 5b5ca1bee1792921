"""The driver protocol every hypervisor implements, and the registry that picks one by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import UsageError


def active_mirror(disk: str, device: str, target: str) -> dict:
    """`blockdev-mirror` arguments of continuous mode: job ``mirror-<disk>`` from node
    ``device`` into ``target``; nothing copied at start (the replica already equals the
    disk), every later guest write acknowledged only once the target has it, and a
    target that fails stops the job instead of the guest."""
    return {"job-id": f"mirror-{disk}", "device": device, "target": target,
            "sync": "none", "copy-mode": "write-blocking",
            "on-target-error": "stop", "on-source-error": "stop",
            "auto-dismiss": True, "auto-finalize": True}


# MIRROR_DISCARDS: every node a mirrored discard crosses (the NBD client nodes on the
# VM's QEMU and the libvirt relay, the replica's head nodes) has `discard: unmap`, QEMU's
# default being `ignore`: a discard the mirror forwards (NBD TRIM) then reaches the
# replica's head. QEMU 7.2's mirror filter itself (mirror_top, opened without
# BDRV_O_UNMAP) drops the guest's discards before the disk while a mirror runs: they
# reach neither the primary's disk nor the replica, which stay equal (checked by
# tests/e2e/test_continuous_discard.py, which also sends a TRIM down the mirror's path).

# QUIET_CANCEL: QEMU 7.2 (Debian 12) now and then corrupts its heap and aborts
# ("malloc_consolidate(): unaligned fastbin chunk detected") when a write-blocking mirror
# is cancelled while guest writes are in flight through it: on libvirt hosts 1 in 54
# switches to periodic in a loop here, 3 in 44 runs of a test that switches modes, none
# in 160 with the pause (docs/architecture.md, continuous mode). Both drivers end mirror
# jobs with the guest paused (its I/O drained), for as long as the cancel takes.
# A pause that waits longer than this on a replica that hangs has its connection cut
# (the waiting writes complete on the disk, the jobs stop with an error, the
# tracking bitmap has those writes).
QUIET_CANCEL_GUARD = 3.0


@dataclass
class DiskInfo:
    name: str            # stable name inside the VM: disk0, disk1, ...
    path: str            # image file (for a replica: the head of its chain)
    format: str          # qcow2 | raw
    virtual_size: int


@dataclass
class VMInfo:
    name: str
    uuid: str
    state: str           # running | stopped
    memory_mb: int
    disks: list[DiskInfo] = field(default_factory=list)
    guest: str | None = None
    pid: int | None = None
    agent: bool = False  # has a guest-agent channel


@dataclass
class BitmapInfo:
    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    count: int = 0       # dirty bytes
    granularity: int = 65536


class BlockSession(Protocol):
    """Access to a VM's disks for change tracking, whether the VM runs or not.

    ``freeze`` atomically (one transaction over all disks) starts bitmap ``new``,
    stops bitmap ``since`` and fixes a point-in-time view of every disk; the view is
    exported over NBD (with ``since`` as its dirty-bitmap context) until ``close``.
    """

    running: bool
    per_disk_bitmaps: bool    # False: release() drops a bitmap on every disk it covers

    def bitmaps(self, disk: str) -> list[BitmapInfo]: ...
    def freeze(self, disks: list[str], since: str | None, new: str | None) -> dict[str, "Export"]: ...
    def release(self, disks: list[str], names: list[str]) -> None: ...
    def restore(self, disks: list[str], since: str, new: str) -> None: ...
    def merge(self, disks: list[str], target: str, sources: list[str]) -> None: ...
    def close(self) -> None: ...


@dataclass
class Export:
    socket: str
    name: str
    size: int
    bitmap_context: str | None = None
    # The image file the export serves as it is at rest (a powered-off VM's disk under a
    # storage daemon: nothing writes it while the view exists), and its format: its data
    # may then be read from the file directly (qemutools.imagemap). None for live views.
    image: str | None = None
    image_format: str | None = None


class Driver(Protocol):
    """Optional: ``set_title(name, title, description=None)`` labels a VM in the
    hypervisor's own tools (libvirt's <title>, e.g. "replica of web1 on site-a"); drivers
    without labels do not have it, so callers use ``getattr(driver, "set_title", None)``.

    Continuous mode (both drivers; primary/continuous.py checks for ``mirror_start``):
    ``pause``/``resume`` the VM; ``watch_monitor(name)`` → a monitor with ``execute``,
    ``wait_event`` (QEMU's events until it exits) and ``close``; ``mirror_start(name,
    disks, target)`` (a write-blocking mirror, see ``active_mirror``), ``mirror_status(name,
    mon=None)`` → {disk: job}, ``mirror_yank(mon, disks)`` → True if the jobs can be
    resumed afterwards, ``mirror_resume(name, disks, target=None)``, ``mirror_stop(name,
    disks)``; optionally ``mirror_relay_socket(name)``, where the watchdog's probe goes
    instead of straight to the replica (libvirt's relay)."""

    name: str

    def list_vms(self) -> list[VMInfo]: ...
    def inspect(self, name: str) -> VMInfo: ...
    def create_vm(self, name: str, sizes: list[int], memory_mb: int, guest: str | None,
                  disk_format: str) -> VMInfo: ...
    def define_vm(self, desc: dict) -> VMInfo: ...
    def describe(self, name: str) -> dict: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str, force: bool = False, timeout: float = 60.0) -> None: ...
    def delete(self, name: str) -> None: ...
    def block_session(self, name: str) -> BlockSession: ...


def get_driver(name: str, home: Path, config: dict) -> Driver:
    """Drivers are chosen by name from the host's configuration."""
    if name == "qemu":
        from .qemu import QemuDriver
        return QemuDriver(home, config)
    if name == "libvirt":
        try:
            from .libvirt import LibvirtDriver
        except ImportError as e:
            raise UsageError(f"the libvirt driver is not available: {e}") from None
        return LibvirtDriver(home, config)
    raise UsageError(f"unknown hypervisor driver {name!r}", hint="choose qemu or libvirt")
