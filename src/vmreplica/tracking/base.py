"""What every tracker yields, and the registry that picks a tracker by name."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass
class Chunk:
    disk: str
    kind: str            # data | zero | trim (see domain.extents)
    offset: int
    length: int
    data: object = None  # bytes-like (nbd.Buffer or bytes) for data chunks


def get_tracker(name: str):
    if name == "bitmap":
        from .bitmap import BitmapTracker
        return BitmapTracker()
    raise UsageError(f"unknown change tracker {name!r}", hint="choose bitmap")
