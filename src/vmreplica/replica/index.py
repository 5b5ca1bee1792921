"""The replica's hash index: the block digests of every head, kept up to date as cycles
are applied, so a resynchronisation compares against it without reading the replica's
disks.

    STORAGE/VM/DISK.index    16-byte BLAKE3 digests, one per 64 KiB block of the disk

A block a record covers only in part gets the UNKNOWN digest; it is read and hashed
when a manifest is asked for. The index is written (and fsynced) before the cycle is
recorded as applied; a re-applied cycle writes the same digests again. While an initial
copy or a resync streams in, or once a failover has changed the disk, the index is not
trusted (``index_valid`` false in the relationship) and the next manifest rebuilds it by
reading the heads.
"""

from __future__ import annotations

import os
from pathlib import Path

from blake3 import blake3

from ..tracking import scan
from ..transport import wire

UNKNOWN = b"\xff" * scan.DIGEST


def path(storage: Path, vm: str, disk: str) -> Path:
    return Path(storage) / vm / f"{disk}.index"


class IndexWriter:
    """Updates the digests of the blocks the applied records cover."""

    def __init__(self, paths: list[Path], sizes: list[int]):
        self.files = []
        for p, size in zip(paths, sizes, strict=False):
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists() or p.stat().st_size != _blocks(size) * scan.DIGEST:
                # No index yet (or a disk of another size): every block unknown until read.
                write(p, UNKNOWN * _blocks(size))
            self.files.append(os.open(p, os.O_RDWR))

    def record(self, rec: wire.Record) -> None:
        fd = self.files[rec.disk]
        b = scan.BLOCK
        first, end = rec.offset // b, (rec.offset + rec.length + b - 1) // b
        if rec.kind == wire.Kind.DATA and rec.check is not None and rec.length == b and \
                rec.offset % b == 0:
            # One whole block: its digest is the start of the record's verified BLAKE3
            # digest (an extendable output: 16 bytes are a prefix of 32), no second hash.
            os.pwrite(fd, rec.check[:scan.DIGEST], first * scan.DIGEST)
            return
        out = bytearray()
        for i in range(first, end):
            lo, hi = i * b, (i + 1) * b
            if lo < rec.offset or hi > rec.offset + rec.length:
                out += UNKNOWN                      # partly covered: hash it when needed
            elif rec.kind == wire.Kind.DATA:
                out += blake3(memoryview(rec.data())[lo - rec.offset:hi - rec.offset]).digest(
                    scan.DIGEST)
            else:
                out += scan.zero_digest(b)
        os.pwrite(fd, bytes(out), first * scan.DIGEST)

    def close(self, sync: bool = True) -> None:
        for fd in self.files:
            if sync:
                os.fsync(fd)
            os.close(fd)
        self.files = []


def init(p: Path, size: int) -> None:
    """A fresh index for an empty disk: every block reads as zeros."""
    write(p, scan.zero_digest(scan.BLOCK) * _blocks(size))


def _blocks(size: int) -> int:
    return (size + scan.BLOCK - 1) // scan.BLOCK


def read(p: Path) -> bytes:
    return Path(p).read_bytes()


def write(p: Path, digests: bytes) -> None:
    tmp = Path(p).with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(digests)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def unknown_blocks(digests: bytes) -> list[int]:
    n = scan.DIGEST
    return [i for i in range(len(digests) // n) if digests[i * n:(i + 1) * n] == UNKNOWN]
