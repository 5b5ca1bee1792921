"""Write verified records into the heads of a VM's chains through its head server.

Every record is an absolute write (data or zeroes at an offset), so applying the same
cycle twice gives the same bytes: a crash mid-apply is repaired by applying it again.
Writes go over NBD with up to 16 requests in flight per head, then each head is flushed.
"""

from __future__ import annotations

import time
from typing import Iterable

from ..errors import IntegrityError
from ..transport import wire
from .heads import HeadServer
from .index import IndexWriter


def apply_records(records: Iterable[wire.Record], server: HeadServer,
                  verify: bool = False, index: IndexWriter | None = None) -> dict:
    """Apply ``records`` (wire disk index = head index); returns totals, and with
    ``verify`` the block digests of every head after the apply (``manifest``)."""
    t0 = time.monotonic()
    writers = server.writers
    stats = {"records": 0, "bytes": 0}
    for rec in records:
        if rec.disk >= len(writers):
            raise IntegrityError(f"record for disk index {rec.disk}; the replica has "
                                 f"{len(writers)} disk(s)")
        w = writers[rec.disk]
        if rec.kind == wire.Kind.DATA:
            w.write(rec.offset, rec.payload)
        else:
            w.zero(rec.offset, rec.length, trim=rec.kind == wire.Kind.TRIM)
        if index is not None:
            index.record(rec)
        stats["records"] += 1
        stats["bytes"] += rec.length
    t1 = time.monotonic()
    for w in writers:
        w.flush()
    server.drop_cached_pages()   # flushed, so clean: keeps the next cycle's writes fast
    if index is not None:
        index.close()    # fsynced before the cycle is recorded as applied
    stats["write_seconds"] = round(t1 - t0, 4)
    stats["flush_seconds"] = round(time.monotonic() - t1, 4)
    if verify:
        from ..tracking.scan import encode
        digests = [server.manifest(i) for i in range(len(writers))]
        stats["manifest"] = [encode(d) for d in digests]
        stats["digests"] = digests      # what the heads hold, read: see receiver._apply_with
    return stats
