"""Following the primary's configuration: what changed in an existing libvirt domain
since its definition and disks were last sent to the replica, and what that means for
the relationship. No I/O.

A cycle compares a digest of the domain's inactive XML with the one last sent (the
primary's relationship row keeps it, ``definition_digest``) and the disks' virtual
sizes with the ones last sent (``disk_sizes``): only a difference costs a request to the
replica. ``disk_plan`` says which disks joined, left or changed size:

- a disk added to the domain joins the relationship and is seeded by a resync (the
  disks already replicated match the replica's copy: only their changes move);
- a disk removed from the domain leaves it (its replica chain is deleted);
- a disk whose image grew (``qemu-img resize``, ``virsh blockresize``): the replica's
  chain grows to the new size; the persistent bitmaps of a qcow2 image grow with it, so
  the next cycles carry what is written in the new area (no resync). A disk that shrank
  has its replica chain cut to the new size too, and is resynchronised (what the bitmap
  says of the area cut off means nothing any more).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .units import format_size


def digest(definition: str) -> str:
    """The digest of a domain's definition (its inactive XML) kept to notice a change."""
    return hashlib.sha256(definition.encode()).hexdigest()


@dataclass(frozen=True)
class DiskPlan:
    """How the replicated disks follow the domain's: ``disks`` replicated from now on (in
    the domain's order), ``excluded`` the operator's exclusions still in the domain."""
    disks: list[str]
    excluded: list[str]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)   # name: (old, new)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.resized)

    @property
    def shrunk(self) -> list[str]:
        return [d for d, (old, new) in self.resized.items() if new < old]

    @property
    def resync(self) -> bool:
        """A resync follows: a disk joined (its seed) or one shrank."""
        return bool(self.added or self.shrunk)

    def refusing(self, refused: list[str]) -> DiskPlan:
        """The plan with added disks that cannot be replicated (a network disk, say)
        left out: they are excluded, as `--exclude-disk` would."""
        return DiskPlan(disks=[d for d in self.disks if d not in refused],
                        excluded=self.excluded + [d for d in refused if d not in self.excluded],
                        added=[d for d in self.added if d not in refused],
                        removed=self.removed, resized=self.resized)

    def lines(self) -> list[str]:
        """``disk vdb added``, ``disk vda grown 64.0 MiB → 96.0 MiB``, ``disk vdc removed``."""
        out = [f"disk {d} added" for d in self.added]
        for d, (old, new) in self.resized.items():
            word = "grown" if new > old else "shrunk"
            out.append(f"disk {d} {word} {format_size(old)} → {format_size(new)}")
        out += [f"disk {d} removed" for d in self.removed]
        return out


def disk_plan(replicated: list[str], excluded: list[str], current: list[tuple[str, int]],
              sent: dict[str, int]) -> DiskPlan:
    """The plan from the disks replicated now, the operator's exclusions, the domain's
    disks as they are (name, virtual size; in its order) and the sizes last sent (a disk
    with no size sent yet is taken as it is: nothing to report)."""
    names = [n for n, _ in current]
    sizes = dict(current)
    added = [n for n in names if n not in replicated and n not in excluded]
    removed = [n for n in replicated if n not in sizes]
    resized = {n: (sent[n], sizes[n]) for n in replicated
               if n in sizes and n in sent and sent[n] != sizes[n]}
    keep = [n for n in names if n in replicated or n in added]
    return DiskPlan(disks=keep, excluded=[n for n in excluded if n in sizes], added=added,
                    removed=removed, resized=resized)
