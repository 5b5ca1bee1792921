"""Hash scan: O(disk size) change detection by comparing block digests, the engine of
resynchronisation (reverse replication, a break in tracking). The side that has the
good data reads its frozen view, hashes every block and ships only the blocks whose
digest differs from the other side's manifest.

Manifests are BLAKE3 digests truncated to 16 bytes, one per ``BLOCK`` of guest-visible
contents; blocks that read as zero are not read (their digest is known).
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterator

from blake3 import blake3

from ..domain import extents as ex
from ..qemutools import imagemap, nbdio
from .base import Chunk

BLOCK = 64 << 10
READ = 1 << 20
DIGEST = 16


@functools.lru_cache(maxsize=8)
def zero_digest(n: int) -> bytes:
    return blake3(bytes(n)).digest(DIGEST)


def manifest(h, size: int, block: int = BLOCK) -> bytes:
    """Concatenated digests of every block of an export opened with base:allocation."""
    out = bytearray()
    for data in _blocks(h, size, block):
        out += zero_digest(len(data[1])) if data[0] else blake3(data[1]).digest(DIGEST)
    return bytes(out)


def _blocks(h, size: int, block: int, reader: imagemap.ImageReader | None = None,
            read: list[int] | None = None) -> Iterator[tuple[bool, memoryview | bytes]]:
    """(is_zero, contents) of every block in order; blocks that read as zero per block
    status are not read, the others are read in runs of up to 1 MiB, 16 in flight (from
    the image file itself where ``reader`` maps them: an image at rest). ``read[0]``
    counts the bytes read."""
    alloc = nbdio.block_status(h, "base:allocation", size)
    data_blocks = {i for off, ln in ex.unselected(alloc, ex.ZERO)
                   for i in range(off // block, (off + ln - 1) // block + 1)}
    reads: list[list[int]] = []
    for i in sorted(data_blocks):
        off, n = i * block, min(block, size - i * block)
        if reads and reads[-1][0] + reads[-1][1] == off and reads[-1][1] + n <= READ:
            reads[-1][1] += n
        else:
            reads.append([off, n])
    if reader is not None:
        pending = imagemap.read_extents(reader, [(o, n) for o, n in reads],
                                        lambda rest: nbdio.read_extents(h, rest))
    else:
        pending = nbdio.read_extents(h, [(o, n) for o, n in reads])
    cur = None
    for i in range((size + block - 1) // block):
        off, n = i * block, min(block, size - i * block)
        if i not in data_blocks:
            yield True, _zeros(n)
            continue
        if cur is None or off >= cur[0] + cur[1]:
            cur = next(pending)
            if read is not None:
                read[0] += cur[1]
        at = off - cur[0]
        if nbdio.is_zero(cur[2], at, n):
            yield True, _zeros(n)
        else:
            yield False, memoryview(cur[2])[at:at + n]


_ZEROS = bytes(BLOCK)


def _zeros(n: int) -> bytes:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


def fill(h, size: int, digests: bytes, blocks: list[int], block: int = BLOCK) -> bytes:
    """Recompute the digests of ``blocks`` by reading them; returns the whole manifest."""
    out = bytearray(digests)
    reads = [(i * block, min(block, size - i * block)) for i in blocks]
    for (_off, n, buf), i in zip(nbdio.read_extents(h, reads), blocks, strict=False):
        out[i * DIGEST:(i + 1) * DIGEST] = zero_digest(n) if nbdio.is_zero(buf) else \
            blake3(buf).digest(DIGEST)
    return bytes(out)


def encode(digests: bytes) -> str:
    return base64.b64encode(digests).decode()


def decode(text: str) -> bytes:
    return base64.b64decode(text)


class ScanPoint:
    """A frozen view whose chunks are the blocks that differ from ``remote`` digests.

    ``costs``: per disk, the bytes read (and hashed), compared and shipped
    (domain.tracking.ScanCost), complete once ``chunks`` is exhausted. With ``exports``
    (a view another point froze: tracking.mixed) it reads those, and leaves ending the
    view and its bitmaps to that point."""

    hold_pause = False      # set by primary.cycle: a live view is verified paused

    def __init__(self, session, disks: list[str], new: str, remote: dict[str, bytes],
                 block: int = BLOCK, exports: dict | None = None):
        self.session, self.disks, self.new, self.block = session, disks, new, block
        self.remote = remote
        self.since = None
        self.tail: str | None = None
        self.read_bytes = 0
        self.owns_view = exports is None
        self.exports = session.freeze(disks, None, new) if exports is None else \
            {d: exports[d] for d in disks}
        self.handles: dict[str, object] = {}
        self.readers: dict[str, imagemap.ImageReader] = {}
        self.compared = 0
        self.differing = 0
        self.costs: dict[str, dict[str, int]] = {
            d: {"read": 0, "compared": 0, "moved": 0} for d in disks}
        try:
            for disk in disks:
                e = self.exports[disk]
                want = (e.size + block - 1) // block * DIGEST
                if len(remote.get(disk, b"")) != want:
                    from ..errors import IntegrityError
                    raise IntegrityError(f"the other side's manifest of {disk} does not match "
                                         f"its size ({e.size} bytes)")
                self.handles[disk] = nbdio.connect(e.socket, e.name, ["base:allocation"])
                if e.image:    # an image at rest: its data may be read from its file
                    reader = imagemap.open_image(e.image, e.image_format or "raw")
                    if reader is not None:
                        self.readers[disk] = reader
        except BaseException:
            self.close()
            if self.owns_view:
                try:
                    self.abort()   # undo the freeze: nothing may be lost, nothing left behind
                except Exception:  # noqa: BLE001 — the next cycle folds leftovers in
                    pass
            raise

    def chunks(self) -> Iterator[Chunk]:
        for disk in self.disks:
            e = self.exports[disk]
            theirs = self.remote[disk]
            cost = self.costs[disk]
            read = [0]
            pos = 0
            blocks = _blocks(self.handles[disk], e.size, self.block, self.readers.get(disk),
                             read)
            for i, (is_zero, data) in enumerate(blocks):
                n = len(data)
                mine = zero_digest(n) if is_zero else blake3(data).digest(DIGEST)
                self.compared += n
                cost["compared"] += n
                cost["read"] = read[0]
                if mine != theirs[i * DIGEST:(i + 1) * DIGEST]:
                    self.differing += n
                    cost["moved"] += n
                    if is_zero:
                        yield Chunk(disk, ex.ZEROED, pos, n)
                    else:
                        yield Chunk(disk, ex.DATA, pos, n, bytes(data))
                pos += n
        if not self.owns_view:
            return      # (the point that froze the view reads its tail)
        from .bitmap import tail_chunks
        for chunk in tail_chunks(self):      # a live view: the blocks written meanwhile
            self.differing += chunk.length
            yield chunk

    @property
    def tracking(self) -> str:
        return self.tail or self.new

    def dirty_bytes(self) -> int:
        return self.differing

    def allocation_handle(self, disk: str):
        """A connection to ``disk``'s frozen view that reports base:allocation."""
        return self.handles[disk]

    def close(self) -> None:
        for h in self.handles.values():
            nbdio.close(h)
        self.handles = {}
        for r in self.readers.values():
            r.close()
        self.readers = {}
        if self.owns_view:
            self.session.unexport()

    def commit(self) -> None:
        """The new bitmap (or a live view's tail) is now the relationship's tracking point."""
        if self.tail:
            self.session.release(self.disks, [self.new])

    def abort(self) -> None:
        self.session.release(self.disks, [self.new] + ([self.tail] if self.tail else []))
