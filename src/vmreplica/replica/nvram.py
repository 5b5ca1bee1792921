"""UEFI variables on the replica host. A VM with UEFI firmware keeps its variables (boot
entries, Secure Boot keys) in an NVRAM file outside its disks; the primary sends them in
every cycle's trailer (primary.cycle.read_nvram). They are kept content-addressed,
``STORAGE/VM/nvram/<BLAKE3>.fd``: written and synced before the cycle that carried them
is recorded as applied (staged.record_applied), so a recorded hash always names a whole
file, and a cycle redone after a crash writes the same file again. The relationship
records the hash of the latest (``nvram``) and of each recovery point
(``nvram_points``); a failover or a test copy from a point gets that point's variables
written into its own NVRAM file before it starts (``restore``)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from ..domain.relationship import Relationship
from ..errors import IntegrityError
from . import store as rstore

NVRAM_LIMIT = 64 << 20        # the largest variable store a trailer may unpack to


def folder(rel: Relationship) -> Path:
    return rstore.vm_dir(Path(rel.storage), rel.vm) / "nvram"


def keep(rel: Relationship, trailer: dict) -> str | None:
    """Store the variables a cycle's trailer carries (verified by their hash); the hash,
    or None when the trailer carries none."""
    digest = trailer.get("nvram_hash")
    if not digest:
        return None
    import blake3
    import zstandard
    path = folder(rel) / f"{digest}.fd"
    if path.exists():
        return digest
    data = zstandard.ZstdDecompressor().decompress(base64.b64decode(trailer["nvram"]),
                                                   max_output_size=NVRAM_LIMIT)
    if blake3.blake3(data).hexdigest() != digest:
        raise IntegrityError(f"the UEFI variables of {rel.vm} do not match their digest")
    _write_durably(path, data)
    return digest


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def of_point(rel: Relationship, point_id: int | None) -> Path | None:
    """The variables of recovery point ``point_id`` (None: the latest state), or None
    when the primary sent none."""
    digest = rel.nvram if point_id is None else rel.nvram_points.get(str(point_id))
    if not digest:
        return None
    path = folder(rel) / f"{digest}.fd"
    return path if path.exists() else None


def restore(rel: Relationship, point_id: int | None, target: str | None) -> bool:
    """Write the point's variables into ``target`` (a VM's own NVRAM file) before it
    starts; False when there is nothing to write (no target, or none were sent)."""
    source = of_point(rel, point_id)
    if source is None or not target:
        return False
    _write_durably(Path(target), source.read_bytes())
    return True


def prune(rel: Relationship, point_ids: list[int]) -> dict[str, str]:
    """Delete the files no longer named (neither the latest nor a remaining point's);
    the point map for the remaining points."""
    points = {str(p): rel.nvram_points[str(p)] for p in point_ids
              if str(p) in rel.nvram_points}
    named = set(points.values()) | ({rel.nvram} if rel.nvram else set())
    d = folder(rel)
    if d.is_dir():
        for f in d.glob("*.fd"):
            if f.stem not in named:
                f.unlink(missing_ok=True)
    return points
