"""What every tracker yields (the registry that picks a tracker by name: ``factory``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Chunk:
    disk: str
    kind: str            # data | zero | trim (see domain.extents)
    offset: int
    length: int
    data: object = None  # bytes-like (nbd.Buffer or bytes) for data chunks
