"""The interface every hypervisor driver implements (its parts as Protocols, combined in
``Driver``), the records it returns, and helpers both drivers share. The registry that
picks a driver by name is hypervisor.factory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NotRequired, Protocol, TypedDict

# QUIET_CANCEL: QEMU 7.2 (Debian 12) now and then corrupts its heap and aborts
# ("malloc_consolidate(): unaligned fastbin chunk detected") when a write-blocking mirror
# is cancelled while guest writes are in flight through it: on libvirt hosts 1 in 54
# switches to periodic in a loop here, 3 in 44 runs of a test that switches modes, none
# in 160 with the pause (docs/architecture.md, continuous mode). Both drivers end mirror
# jobs with the guest paused (its I/O drained), for as long as the cancel takes
# (qemutools.qmpsteps.quiet_guest). A pause that waits longer than this on a replica
# that hangs has its connection cut (the waiting writes complete on the disk, the jobs
# stop with an error, the tracking bitmap has those writes).
QUIET_CANCEL_GUARD = 3.0


@dataclass
class DiskInfo:
    name: str            # stable name inside the VM: disk0, disk1, ... (an existing
                         # libvirt domain's disks: their target dev, vda, vdb, ...)
    path: str            # image file (for a replica: the head of its chain)
    format: str          # qcow2 | raw
    virtual_size: int
    kind: str = "file"   # file; an existing libvirt domain's disk may also be block,
                         # network, volume, ... (libvirt's disk type; `enable` takes file
                         # and block disks, refuses the others)


class Origin(StrEnum):
    """Who made a VM. vmreplica: `vm create`, a replica, a failed-over or test copy — it
    defines, repoints and deletes them. existing: an operator's libvirt domain, taken as
    it is — never redefined, repointed or deleted (its disks stay where they are, even
    as the replica side of a reverse: replica.points.follow_heads, replica.failover)."""
    VMREPLICA = "vmreplica"
    EXISTING = "existing"


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
    origin: Origin = Origin.VMREPLICA
    notes: list[str] = field(default_factory=list)  # define_vm: what it changed or left
                               # out of a carried definition (hypervisor.libvirt.carry)
    nics: list[str] = field(default_factory=list)   # the MAC address of each NIC, in the
                               # order of its definition (failover IPs name them)


@dataclass
class DefinitionUpdate:
    """What ``follow_definition`` changed in a replica VM's definition (one line each:
    ``memory 256 MiB → 384 MiB``) and its notes (what the carry changed or left out)."""
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class BitmapInfo:
    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    count: int = 0       # dirty bytes
    granularity: int = 65536

    @classmethod
    def from_qmp(cls, name: str, b: dict) -> BitmapInfo:
        """From an entry of a node's ``dirty-bitmaps`` (query-named-block-nodes)."""
        return cls(name, bool(b.get("recording")), bool(b.get("persistent")),
                   bool(b.get("inconsistent")), int(b.get("count", 0)),
                   int(b.get("granularity", 65536)))


class BlockSession(Protocol):
    """Access to a VM's disks for change tracking, whether the VM runs or not.

    ``freeze`` atomically (one transaction over all disks) starts bitmap ``new``,
    stops bitmap ``since`` and fixes a point-in-time view of every disk; the view is
    exported over NBD (with ``since`` as its dirty-bitmap context) until ``unexport``
    or ``close``. Where a frozen view is refused (beside continuous mode's mirror) a
    session with live views (BlockAccess.live_views) exports a live one and sets
    ``live``; ``settle`` then pauses the guest and exports what changed meanwhile,
    ``end_pause`` resumes it, ``paused_seconds`` says for how long. A session without
    live views never sets ``live``: its ``settle`` raises Unsupported, its
    ``end_pause`` does nothing.
    """

    running: bool
    per_disk_bitmaps: bool    # False: release() drops a bitmap on every disk it covers
    live: bool
    paused_seconds: float

    def bitmaps(self, disk: str) -> list[BitmapInfo]: ...
    def freeze(self, disks: list[str], since: str | None, new: str | None) -> dict[str, Export]: ...
    def settle(self, disks: list[str], new: str, tail: str) -> dict[str, Export]: ...
    def end_pause(self) -> None: ...
    def unexport(self) -> None: ...
    def add_bitmap(self, disks: list[str], name: str) -> None: ...
    def release(self, disks: list[str], names: list[str]) -> None: ...
    def restore(self, disks: list[str], since: str, new: str) -> None: ...
    def merge(self, disks: list[str], target: str, sources: list[str]) -> None: ...
    def close(self) -> None: ...
    def __enter__(self): ...
    def __exit__(self, *exc): ...


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


# -- the driver's interface ----------------------------------------------------------------
# A driver is one class implementing every Protocol below (``Driver`` combines them);
# tests/unit/test_driver_interface.py checks that each driver class has every method
# with a compatible signature. Callers call the methods plainly, never probe with
# hasattr/getattr. A driver that lacks a capability still has the method and raises
# ``errors.Unsupported`` with a message the user reads; what a caller must know before
# it starts something (continuous mode, a DR link beside it) is a declared boolean.


class VMCheck(TypedDict):
    """The VM checker's view (`vmreplica vm check`, the cluster agent's monitor)."""

    process: bool            # the hypervisor's process of the VM exists
    qmp: str | None          # its run state in QMP's words (running, paused, io-error,
                             # shutdown, guest-panicked, inmigrate, ...); None without a process
    agent: str | None        # "ok", "error: ..." or None (the VM has no guest agent)
    uptime: float | None     # seconds since the process started
    state: NotRequired[str]  # the hypervisor's own words when they say more (libvirt:
                             # its state and reason, e.g. "paused (user)")


class Inventory(Protocol):
    """Inventory and power: the VMs of this host, their definitions, start/stop/pause."""

    name: str

    def list_vms(self) -> list[VMInfo]: ...
    def inspect(self, name: str) -> VMInfo: ...
    def describe(self, name: str) -> dict: ...
    def exists(self, name: str) -> bool: ...
    def create_vm(self, name: str, sizes: list[int], memory_mb: int = 256,
                  guest: str | None = None, disk_format: str = "qcow2",
                  share_rw: bool = False) -> VMInfo: ...
    def define_vm(self, desc: dict) -> VMInfo: ...
    def delete(self, name: str) -> None: ...
    def set_disks(self, name: str, disks: dict[str, str]) -> None: ...
    def replace_disks(self, name: str, disks: list[dict]) -> None: ...
    def follow_definition(self, name: str, definition: str,
                          network_map: dict[str, str]) -> DefinitionUpdate:
        """Define the stopped replica VM ``name`` again from its primary's new whole
        definition (an existing libvirt domain's XML), keeping its name, identity and
        disks, its NICs on ``network_map``; what changed. Unsupported where VMs are not
        defined from their primary's definition (the qemu driver)."""
    def add_owned(self, name: str, paths: list[str]) -> None: ...
    def set_title(self, name: str, title: str, description: str | None = None) -> None:
        """Label the VM in the hypervisor's own tools (libvirt's <title>, e.g. "replica
        of web1 on site-a"; the qemu driver keeps it in the VM's description)."""
    def start(self, name: str) -> None:
        """Power on; a VM with a saved state (SaveRestore.save) resumes from it."""
    def stop(self, name: str, force: bool = False, timeout: float = 60.0) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def resume_left_paused(self) -> list[str]:
        """At daemon start: resume the VMs a dead daemon left paused; their names."""
    def check(self, name: str) -> VMCheck: ...
    def nvram_path(self, name: str) -> str | None:
        """The file of the VM's UEFI variables (libvirt's ``<nvram>``), None when it has
        none (BIOS firmware; the qemu driver's VMs)."""


class GuestAgent(Protocol):
    """Calls into the guest agent (qemu-guest-agent); HypervisorError when it has none."""

    def agent_command(self, name: str, command: str, arguments: dict | None = None,
                      timeout: float = 10.0, expect_reply: bool = True): ...
    def freeze_filesystems(self, name: str, timeout: float = 15.0) -> None: ...
    def thaw_filesystems(self, name: str) -> None: ...


class BlockAccess(Protocol):
    """Block sessions for change tracking, and direct disk I/O.

    ``live_views``: its block sessions can read a live view that converges (settle)
    where a frozen one is refused, i.e. beside continuous mode's mirror (a DR link
    beside continuous mode needs it). ``io`` runs a qemu-io command through the VM's
    own device (benchmarks; Unsupported where the driver cannot).

    ``disk_tracking(name)``: how each disk of the VM is tracked (domain.tracking). A
    ``scan`` disk holds no bitmap: its session's ``freeze`` ignores ``since`` for it and
    exports it without a dirty-bitmap context, ``bitmaps`` lists none on it, and a delta
    cycle compares it block by block with the replica's hash index."""

    live_views: bool

    def block_session(self, name: str) -> BlockSession: ...
    def disk_tracking(self, name: str) -> dict[str, str]: ...
    def drop_left_views(self) -> list[str]:
        """At daemon start: remove what a dead daemon's block session left in running
        VMs; the names of the VMs it cleaned."""
    def close_idle(self) -> None:
        """Stop what the driver keeps between block sessions (a storage daemon for the
        sessions of powered-off VMs) once it has had nothing open for a while; the
        scheduler asks at every tick."""
    def close_kept(self) -> None:
        """At daemon stop: stop what the driver keeps between block sessions."""
    def io(self, name: str, disk: str, command: str) -> str: ...


class Collapse(Protocol):
    """A failed-over VM's chain (overlay → layers → base) merged into its base while the
    VM runs (replica.collapse)."""

    def collapse_prepare(self, name: str, bases: dict[str, str]) -> None: ...
    def collapse_live(self, name: str, bases: dict[str, str], timeout: float = 3600.0,
                      poll: float = 0.05) -> dict[str, int]: ...
    def collapse_done(self, name: str, bases: dict[str, str]) -> None: ...


class Mirror(Protocol):
    """Continuous mode: a write-blocking mirror of the VM's disks
    (qemutools.qmpsteps.active_mirror).

    ``continuous``: the mirror_* methods work (False: they raise Unsupported, and
    enabling continuous mode is refused up front). ``watch_monitor(name)`` → a monitor
    with ``execute``, ``wait_event`` (QEMU's events until it exits) and ``close``;
    ``mirror_status(name, mon=None)`` → {disk: job}; ``mirror_yank(mon, disks)`` → True
    if the jobs can be resumed afterwards; ``mirror_relay_socket(name)`` → where the
    watchdog's probe goes instead of straight to the replica (libvirt's relay), or None."""

    continuous: bool

    def watch_monitor(self, name: str): ...
    def mirror_start(self, name: str, disks: list[str], target: dict) -> None: ...
    def mirror_status(self, name: str, mon=None) -> dict[str, dict]: ...
    def mirror_yank(self, mon, disks: list[str]) -> bool: ...
    def mirror_resume(self, name: str, disks: list[str], target: dict | None = None) -> None: ...
    def mirror_stop(self, name: str, disks: list[str]) -> None: ...
    def mirror_relay_socket(self, name: str) -> str | None: ...


class SaveRestore(Protocol):
    """The cluster's `save` stop mode: the running VM's memory and device state to disk,
    the VM stopped; the next start resumes from it."""

    def save(self, name: str, timeout: float = 300.0) -> Path:
        """Save and stop; the saved state's file."""
    def saved_state(self, name: str) -> Path | None:
        """The saved state the next start resumes from, or None."""
    def discard_saved(self, name: str) -> None:
        """Forget the saved state (its disks are about to change under it)."""


class Driver(Inventory, GuestAgent, BlockAccess, Collapse, Mirror, SaveRestore, Protocol):
    """A hypervisor driver: every part above. Chosen by name from the host's
    configuration (hypervisor.factory.get_driver)."""


INTERFACES: tuple[type, ...] = (Inventory, GuestAgent, BlockAccess, Collapse, Mirror,
                                SaveRestore)


def process_age(pid: int) -> float | None:
    """Seconds since process `pid` started (/proc), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def block_device_size(path: str) -> int:
    """A block device's size in bytes (where it ends: its st_size says 0), 0 if it
    cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0
    finally:
        os.close(fd)
