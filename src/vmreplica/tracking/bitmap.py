"""Persistent dirty bitmaps: O(changed bytes) change tracking.

Each relationship owns bitmaps named ``vmreplica-<rel8>-<cycle>`` on every replicated
disk. A cycle freezes (starts the next bitmap, stops the current one, fixes the view),
reads the dirty extents of the stopped bitmap over NBD, and after the replica's ack
removes it; a failed cycle folds the new bitmap back into it (nothing is lost). A
bitmap that is missing, or inconsistent (its QEMU died without storing it), breaks
continuity: ``TrackingError``, and the relationship needs a resynchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..domain import extents as ex
from ..errors import TrackingError
from ..qemutools import imagemap, nbdio
from ..qemutools.buffers import POOL
from .base import Chunk

READ_SIZE = 1 << 20       # data records of at most 1 MiB, aligned
ZERO_SIZE = 1 << 30       # zero records of at most 1 GiB


def bitmap_prefix(rel_id: str) -> str:
    return f"vmreplica-{rel_id[:8]}-"


class BitmapTracker:
    name = "bitmap"

    def prepare(self, session, disks: list[str], since: str, prefix: str) -> None:
        """Check continuity of ``since`` on every disk; fold in bitmaps a crash left behind."""
        stale: set[str] = set()
        stopped = False        # ``since`` stopped recording on some disk
        for disk in disks:
            maps = {b.name: b for b in session.bitmaps(disk)}
            b = maps.get(since)
            if b is None:
                raise TrackingError(f"change-tracking bitmap {since} is missing on disk {disk}")
            if b.inconsistent:
                raise TrackingError(f"change-tracking bitmap {since} on disk {disk} is "
                                    "unusable (inconsistent or missing: its QEMU stopped "
                                    "without saving it, or it was removed)")
            others = {n for n, m in maps.items() if n.startswith(prefix) and n != since}
            bad = [n for n in others if maps[n].inconsistent]
            if bad:
                raise TrackingError(f"change-tracking bitmap {bad[0]} on disk {disk} is "
                                    "inconsistent")
            if not b.recording and not others:
                raise TrackingError(f"change-tracking bitmap {since} on disk {disk} stopped "
                                    "recording and nothing recorded in its place")
            stale |= others
            stopped = stopped or not b.recording
        if stale or stopped:
            session.merge(disks, since, sorted(stale))

    def point(self, session, disks: list[str], since: str | None, new: str) -> BitmapPoint:
        return BitmapPoint(session, disks, since, new)

    def owned(self, session, disks: list[str], prefix: str) -> set[str]:
        return {b.name for d in disks for b in session.bitmaps(d) if b.name.startswith(prefix)}


class BitmapPoint:
    """A frozen point: the changed extents since ``since`` (everything allocated if None).
    With ``exports`` (a view another point froze: tracking.mixed) it reads those, and
    leaves ending the view to that point."""

    compared: int | None = None   # a change point compares no digests (ScanPoint does)
    hold_pause = False            # set by primary.cycle: a live view is verified paused

    def __init__(self, session, disks: list[str], since: str | None, new: str,
                 exports: dict | None = None):
        self.session, self.disks, self.since, self.new = session, disks, since, new
        self.owns_view = exports is None
        self.exports = session.freeze(disks, since, new) if exports is None else \
            {d: exports[d] for d in disks}
        self.handles: dict[str, Any] = {}      # nbd.NBD handles
        self._status: dict[str, Any] = {}    # connections opened by allocation_handle
        self.readers: dict[str, imagemap.ImageReader] = {}
        self.read_bytes = 0
        self.costs: dict[str, dict[str, int]] = {}   # (no disk scanned)
        self.plan: dict[str, list[tuple[str, int, int]]] = {}
        try:
            for disk in disks:
                e = self.exports[disk]
                reader = None
                if e.image:    # an image at rest: its data may be read from its file
                    reader = imagemap.open_image(e.image, e.image_format or "raw")
                    if reader is not None:
                        self.readers[disk] = reader
                # Where a delta's dirty extents hold data: the image's own tables if it
                # is at rest (imagemap.allocation), else QEMU's view of the whole disk
                # (which QEMU computes for every block-status request of a connection
                # that asked for it: asked for only where it is used).
                mapped = bool(e.bitmap_context) and reader is not None and \
                    reader.knows_allocation
                contexts = ([] if mapped else ["base:allocation"]) + \
                    ([e.bitmap_context] if e.bitmap_context else [])
                h = nbdio.connect(e.socket, e.name, contexts)
                self.handles[disk] = h
                if e.bitmap_context:
                    dirty = ex.selected(nbdio.block_status(h, e.bitmap_context, e.size), ex.DIRTY)
                    alloc = reader.allocation(dirty) if mapped and reader is not None else None
                    if alloc is None:
                        alloc = _allocation(e) if mapped else \
                            nbdio.block_status(h, "base:allocation", e.size)
                    self.plan[disk] = list(ex.classify(dirty, alloc))
                else:  # initial copy: allocated data only (the replica starts empty)
                    alloc = nbdio.block_status(h, "base:allocation", e.size)
                    self.plan[disk] = [p for p in ex.classify([(0, e.size)], alloc)
                                       if p[0] == ex.DATA]
        except BaseException:
            self.close()
            if self.owns_view:
                try:
                    self.abort()   # undo the freeze: nothing may be lost, nothing left behind
                except Exception:  # noqa: BLE001 — the next cycle folds leftovers in
                    pass
            raise

    def dirty_bytes(self) -> int:
        return sum(n for plan in self.plan.values() for _, _, n in plan)

    def data_bytes(self) -> int:
        return sum(n for plan in self.plan.values() for k, _, n in plan if k == ex.DATA)

    tail: str | None = None

    @property
    def tracking(self) -> str:
        """The bitmap that records the guest's writes from this point on."""
        return self.tail or self.new

    def chunks(self) -> Iterator[Chunk]:
        for disk in self.disks:
            yield from plan_chunks(self, disk, self.handles[disk], self.plan[disk])
        if self.owns_view:      # (else the point that froze the view reads its tail)
            yield from tail_chunks(self)

    def allocation_handle(self, disk: str):
        """A connection to ``disk``'s frozen view that reports base:allocation (for a
        whole-disk digest manifest: `sync --verify`)."""
        h = self.handles[disk]
        if h.can_meta_context("base:allocation"):
            return h
        if disk not in self._status:
            e = self.exports[disk]
            self._status[disk] = nbdio.connect(e.socket, e.name, ["base:allocation"])
        return self._status[disk]

    def close(self) -> None:
        """Disconnect and drop the exports (and fleecing) — before commit or abort."""
        for h in [*self.handles.values(), *self._status.values()]:
            nbdio.close(h)
        self.handles, self._status = {}, {}
        for r in self.readers.values():
            r.close()
        self.readers = {}
        if self.owns_view:
            self.session.unexport()

    def commit(self) -> None:
        """The replica acknowledged: the old point (and a settled live view's ``new``) is
        no longer needed."""
        done = ([self.since] if self.since else []) + ([self.new] if self.tail else [])
        if done:
            self.session.release(self.disks, done)

    def abort(self) -> None:
        """The cycle failed: fold the new bitmaps back so nothing since ``since`` is lost."""
        if self.since:
            self.session.restore(self.disks, self.since, self.new)
            if self.tail:
                self.session.merge(self.disks, self.since, [self.tail])
        else:
            self.session.release(self.disks, [self.new] + ([self.tail] if self.tail else []))


def _allocation(e) -> list[tuple[int, int, int]]:
    """QEMU's base:allocation of export ``e``, on a connection of its own."""
    h = nbdio.connect(e.socket, e.name, ["base:allocation"])
    try:
        return nbdio.block_status(h, "base:allocation", e.size)
    finally:
        nbdio.close(h)


def plan_chunks(point, disk: str, h, plan) -> Iterator[Chunk]:
    """The chunks of a plan of (kind, offset, length) extents: data read from ``h`` (16
    requests in flight, chunks of at most 1 MiB; the wire writer sends data that reads as
    zero as a zero record), zero and trim extents as they are."""
    reads = [(o, n) for k, off, ln in plan if k == ex.DATA for o, n in ex.split(off, ln, READ_SIZE)]
    reader = point.readers.get(disk)
    if reader is not None:      # an image at rest: from its file where QEMU maps it plainly
        data = imagemap.read_extents(reader, reads,
                                     lambda rest: nbdio.read_extents(h, rest, pool=POOL),
                                     pool=POOL)
    else:
        data = nbdio.read_extents(h, reads, pool=POOL)   # the consumer gives buffers back
    for kind, off, ln in plan:
        if kind != ex.DATA:
            for o, n in ex.split(off, ln, ZERO_SIZE):
                yield Chunk(disk, kind, o, n)
            continue
        for _ in ex.split(off, ln, READ_SIZE):
            o, n, buf = next(data)
            point.read_bytes += n
            yield Chunk(disk, ex.DATA, o, n, buf)


def tail_chunks(point) -> Iterator[Chunk]:
    """A live view (the session could not freeze one: continuous mode's mirror holds the
    disks) converges here: the guest pauses, ``point.tail`` starts recording, and the
    blocks ``point.new`` recorded while the view was read are read again and shipped
    after everything else — the replica applies the cycle in order, so it ends equal to
    the disks at the pause. The pause lasts as long as those blocks take to read."""
    session = point.session
    if not session.live:
        return
    point.tail = f"{point.new}-t"
    chunks: list[Chunk] = []
    try:
        exports = session.settle(point.disks, point.new, point.tail)
        for disk in point.disks:
            e = exports[disk]
            h = nbdio.connect(e.socket, e.name, ["base:allocation", e.bitmap_context])
            try:
                alloc = nbdio.block_status(h, "base:allocation", e.size)
                dirty = ex.selected(nbdio.block_status(h, e.bitmap_context, e.size), ex.DIRTY)
                chunks += plan_chunks(point, disk, h, list(ex.classify(dirty, alloc)))
            finally:
                nbdio.close(h)
    finally:
        # Read into memory first: the guest waits for no network. (A cycle that verifies
        # the replica against this view keeps the guest paused until it has: hold_pause.)
        if not point.hold_pause:
            session.end_pause()
    yield from chunks
