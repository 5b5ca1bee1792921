"""Write verified records into the heads of a VM's chains through its head server.

Every record is an absolute write (data or zeroes at an offset), so applying the same
cycle twice gives the same bytes: a crash mid-apply is repaired by applying it again.
Writes go over NBD with up to 16 requests in flight per head, then each head is flushed
(qcow2's metadata into the file: readers see the cycle; the head server fdatasyncs the
file: heads.HeadServer) and, when ``durable``, synced with the hash index here instead of
at the checkpoint after the ack.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..errors import IntegrityError
from ..transport import wire
from .heads import HeadServer
from .index import IndexWriter


def apply_records(records: Iterable[wire.Record], server: HeadServer,
                  verify: bool = False, index: IndexWriter | None = None,
                  durable: bool = True) -> dict:
    """Apply ``records`` (wire disk index = head index); returns totals, and with
    ``verify`` the block digests of every head after the apply (``manifest``). Without
    ``durable`` nothing is synced beyond the flush: the checkpoint after the ack syncs
    the index (replica.checkpoint)."""
    t0 = time.monotonic()
    writers = server.writers
    stats: dict = {"records": 0, "bytes": 0}
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
    if durable:
        server.sync()
        server.drop_cached_pages()   # synced, so clean: out of the page cache
    if index is not None:
        index.close(sync=durable)    # durable before the cycle is recorded as applied,
        # or with the heads after the ack (replica.checkpoint)
    stats["write_seconds"] = round(t1 - t0, 4)
    stats["flush_seconds"] = round(time.monotonic() - t1, 4)
    if verify:
        from ..tracking.scan import encode
        digests = [server.manifest(i) for i in range(len(writers))]
        stats["manifest"] = [encode(d) for d in digests]
        stats["digests"] = digests      # what the heads hold, read: see staged.write_heads
    return stats
