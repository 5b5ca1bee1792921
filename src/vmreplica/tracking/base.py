"""What every tracker yields (the registry that picks a tracker by name: ``factory``).

A tracker's frozen point (``bitmap.BitmapPoint``, ``scan.ScanPoint``, and
``mixed.MixedPoint`` over both kinds of disk) is read by the cycle
through the attributes of ``Point``; the two kinds are told apart by ``compared`` (None:
the point ships changes; a byte count: it compares block digests), never by probing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Chunk:
    disk: str
    kind: str            # data | zero | trim (see domain.extents)
    offset: int
    length: int
    data: object = None  # bytes-like (nbd.Buffer or bytes) for data chunks


class Point(Protocol):
    """A frozen point of a VM's disks, as a cycle reads it."""

    disks: list[str]
    exports: dict
    readers: dict           # disk -> an image read from its file at rest (or absent)
    read_bytes: int
    compared: int | None    # bytes of digests compared so far; None for a change point
    costs: dict             # disk -> {read, compared, moved} of each disk it scanned
    hold_pause: bool        # keep a live view's guest paused until the cycle verified
