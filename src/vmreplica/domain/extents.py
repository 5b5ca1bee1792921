"""Extent maths: runs of a disk as (offset, length), merged, split, classified. Pure.

A *status run* is (offset, length, flags) as NBD block status reports it: for
``base:allocation`` flags bit 0 = hole, bit 1 = reads as zero; for a
``qemu:dirty-bitmap:`` context bit 0 = dirty.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

HOLE = 1
ZERO = 2
DIRTY = 1

DATA, ZEROED, TRIMMED = "data", "zero", "trim"


def runs_from_entries(offset: int, entries: list[int]) -> list[tuple[int, int, int]]:
    """NBD block-status entries [len, flags, len, flags, ...] starting at ``offset``."""
    out, pos = [], offset
    for i in range(0, len(entries) - 1, 2):
        length, flags = entries[i], entries[i + 1]
        out.append((pos, length, flags))
        pos += length
    return out


def merge(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or touching extents."""
    out: list[list[int]] = []
    for off, ln in sorted(e for e in extents if e[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + ln - out[-1][0])
        else:
            out.append([off, ln])
    return [(o, n) for o, n in out]


def selected(runs: Iterable[tuple[int, int, int]], mask: int) -> list[tuple[int, int]]:
    """Merged extents of the runs whose flags have any bit of ``mask`` set."""
    return merge((o, n) for o, n, f in runs if f & mask)


def unselected(runs: Iterable[tuple[int, int, int]], mask: int) -> list[tuple[int, int]]:
    return merge((o, n) for o, n, f in runs if not f & mask)


def classify(extents: list[tuple[int, int]],
             alloc: list[tuple[int, int, int]]) -> Iterator[tuple[str, int, int]]:
    """Cut ``extents`` (sorted, merged) by the allocation runs (sorted, covering them).

    Yields (kind, offset, length) with kind DATA (must be read), ZEROED (allocated but
    reads as zero) or TRIMMED (a hole: unallocated at the source); adjacent pieces of the
    same kind are joined.
    """
    i = 0
    pending: list = []
    for off, ln in extents:
        end = off + ln
        pos = off
        while pos < end:
            while i < len(alloc) and alloc[i][0] + alloc[i][1] <= pos:
                i += 1
            if i == len(alloc) or alloc[i][0] > pos:
                # Not covered by allocation status: read it, never guess.
                nxt = alloc[i][0] if i < len(alloc) else end
                kind, stop = DATA, min(end, nxt)
            else:
                a_off, a_len, flags = alloc[i]
                stop = min(end, a_off + a_len)
                kind = TRIMMED if flags & HOLE and flags & ZERO else ZEROED if flags & ZERO else DATA
            if pending and pending[0] == kind and pending[1] + pending[2] == pos:
                pending[2] += stop - pos
            else:
                if pending:
                    yield tuple(pending)
                pending = [kind, pos, stop - pos]
            pos = stop
    if pending:
        yield tuple(pending)


def split(offset: int, length: int, size: int) -> Iterator[tuple[int, int]]:
    """Cut one extent into pieces of at most ``size`` bytes, aligned to ``size``."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // size + 1) * size)
        yield offset, stop - offset
        offset = stop


def total(extents: Iterable[tuple[int, int]]) -> int:
    return sum(n for _, n in extents)
