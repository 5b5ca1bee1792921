"""How each replicated disk's changes are tracked, and what scanning one cost: the words
`status` and `measure` show per disk. The hypervisor driver says which kind a disk gets
(BlockAccess.disk_tracking); a cycle records what its scan of each scan-tracked disk read
and moved (``ScanCost``). No I/O.

- ``checkpoint``: libvirt checkpoints — QEMU persistent dirty bitmaps in a qcow2 image,
  kept across restarts; a cycle reads only the changed extents.
- ``bitmap``: QEMU persistent dirty bitmaps kept by vmreplica itself (the qemu driver).
- ``bitmap, scan after restart``: a raw image under the qemu driver — a bitmap while its
  QEMU runs; after a restart the bitmap is gone and a hash resync compares the disk.
- ``scan``: no bitmap at all (a raw file or a block device of a libvirt domain): every
  cycle reads the whole disk (but its holes), hashes each 64 KiB block and ships the
  blocks whose digest differs from the replica's hash index — O(disk size) read,
  O(changed blocks) moved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .units import format_size

CHECKPOINT = "checkpoint"
BITMAP = "bitmap"
VOLATILE = "bitmap, scan after restart"
SCAN = "scan"
KINDS = (CHECKPOINT, BITMAP, VOLATILE, SCAN)


def scanned(tracking: dict[str, str], disks: list[str]) -> list[str]:
    """The disks of ``disks`` a delta cycle compares by hash scan, in their order."""
    return [d for d in disks if tracking.get(d) == SCAN]


@dataclass(frozen=True)
class ScanCost:
    """What one cycle's scan of a disk cost: bytes read from it (and hashed), bytes of
    blocks it compared (the whole disk: holes are compared without a read), bytes it
    shipped (the blocks that differed), and when."""
    read: int
    compared: int
    moved: int
    at: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScanCost:
        return cls(int(d.get("read", 0)), int(d.get("compared", 0)), int(d.get("moved", 0)),
                   float(d.get("at", 0.0)))


@dataclass(frozen=True)
class DiskTracking:
    """One line of `status`/`measure`: a disk, how it is tracked, its last scan's cost."""
    disk: str
    tracking: str
    last_scan: ScanCost | None = None

    def to_dict(self) -> dict:
        out: dict = {"disk": self.disk, "tracking": self.tracking}
        out["last_scan"] = self.last_scan.to_dict() if self.last_scan else None
        return out

    def text(self) -> str:
        """``vdb: scan (last cycle read 64.0 MiB, moved 128.0 KiB)``."""
        words = f"{self.disk}: {self.tracking}"
        if self.last_scan is not None:
            words += (f" (last cycle read {format_size(self.last_scan.read)}, moved "
                      f"{format_size(self.last_scan.moved)})")
        return words


def disk_lines(disks: list[str], tracking: dict[str, str],
               costs: dict[str, dict]) -> list[DiskTracking]:
    """The per-disk tracking lines of a relationship (its disks in order; a disk whose
    tracking is not known yet says ``unknown``)."""
    return [DiskTracking(d, tracking.get(d, "unknown"),
                         ScanCost.from_dict(costs[d]) if d in costs else None)
            for d in disks]


def text_of(line: dict) -> str:
    """The text of a line as the API carries it (``DiskTracking.to_dict``)."""
    cost = line.get("last_scan")
    return DiskTracking(line["disk"], line["tracking"],
                        ScanCost.from_dict(cost) if cost else None).text()
