"""A delta over disks tracked two ways at one frozen point: the disks that keep a dirty
bitmap (libvirt checkpoints) ship their dirty extents (``bitmap.BitmapPoint``), the disks
that cannot keep one (a raw file, a block device of a libvirt domain:
domain.tracking.SCAN) ship the blocks whose digests differ from the replica's hash index
(``scan.ScanPoint``: the whole disk is read and hashed, only what differs moves).

One ``session.freeze`` covers every disk — the point in time is the same for all of them
— with ``since`` for the bitmap disks (the session ignores it on disks that hold no
bitmap, and exports those without a dirty-bitmap context). The two parts read the views
this point froze; it ends them, commits and aborts the bitmaps for both.
"""

from __future__ import annotations

from collections.abc import Iterator

from .base import Chunk
from .bitmap import BitmapPoint, tail_chunks
from .scan import ScanPoint


class MixedPoint:
    hold_pause = False      # set by primary.cycle: a live view is verified paused
    compared: int | None = None   # progress counts bytes read (scanned disks: compared)

    def __init__(self, session, disks: list[str], since: str | None, new: str,
                 remote: dict[str, bytes]):
        self.session, self.disks, self.since, self.new = session, disks, since, new
        self.tail: str | None = None
        self._tail_read = 0
        scanned = [d for d in disks if d in remote]
        tracked = [d for d in disks if d not in remote]
        self.exports = session.freeze(disks, since, new)
        self.bitmap: BitmapPoint | None = None
        self.scan: ScanPoint | None = None
        try:
            if tracked:
                self.bitmap = BitmapPoint(session, tracked, since, new, exports=self.exports)
            self.scan = ScanPoint(session, scanned, new, remote, exports=self.exports)
        except BaseException:
            self.close()
            try:
                self.abort()   # undo the freeze: nothing may be lost, nothing left behind
            except Exception:  # noqa: BLE001 — the next cycle folds leftovers in
                pass
            raise

    def _parts(self) -> list:
        return [p for p in (self.bitmap, self.scan) if p is not None]

    @property
    def readers(self) -> dict:
        return {d: r for p in self._parts() for d, r in p.readers.items()}

    @property
    def costs(self) -> dict[str, dict[str, int]]:
        return self.scan.costs if self.scan is not None else {}

    @property
    def read_bytes(self) -> int:
        """Bytes read so far: the bitmap disks' changed data, the scanned disks' blocks
        compared (each is read or known to be a hole), a live view's tail."""
        return (self.bitmap.read_bytes if self.bitmap else 0) + \
            (self.scan.compared if self.scan else 0) + self._tail_read

    @read_bytes.setter
    def read_bytes(self, value: int) -> None:      # (bitmap.plan_chunks counts the tail)
        self._tail_read += value - self.read_bytes

    def data_bytes(self) -> int:
        """What ``read_bytes`` reaches at the end (without a live view's tail)."""
        return (self.bitmap.data_bytes() if self.bitmap else 0) + \
            (sum(self.exports[d].size for d in self.scan.disks) if self.scan else 0)

    def dirty_bytes(self) -> int:
        return sum(p.dirty_bytes() for p in self._parts())

    def chunks(self) -> Iterator[Chunk]:
        for p in self._parts():
            yield from p.chunks()
        yield from tail_chunks(self)      # a live view: the blocks written meanwhile

    @property
    def tracking(self) -> str:
        return self.tail or self.new

    def allocation_handle(self, disk: str):
        for p in self._parts():
            if disk in p.disks:
                return p.allocation_handle(disk)
        raise KeyError(disk)

    def close(self) -> None:
        for p in self._parts():
            p.close()
        self.session.unexport()

    def commit(self) -> None:
        if self.bitmap is not None:
            self.bitmap.tail = self.tail
            self.bitmap.commit()
        elif self.tail:
            self.session.release(self.disks, [self.new])

    def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.tail = self.tail
            self.bitmap.abort()
        else:
            self.session.release(self.disks, [self.new] + ([self.tail] if self.tail else []))
