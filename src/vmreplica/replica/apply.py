"""Write verified records into the heads of a VM's chains through qemu-storage-daemon.

Every record is an absolute write (data or zeroes at an offset), so applying the same
cycle twice gives the same bytes: a crash mid-apply is repaired by applying it again.
Writes go over NBD with up to 16 requests in flight per head, then each head is flushed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from ..errors import IntegrityError
from ..qemutools import nbdio
from ..qemutools.qsd import StorageDaemon, qcow2_node
from ..transport import wire

log = logging.getLogger("vmreplica.replica")


def apply_records(records: Iterable[wire.Record], heads: list[str], run_dir: Path,
                  name: str, verify: bool = False) -> dict:
    """Apply ``records`` (wire disk index = position in ``heads``); returns totals, and
    with ``verify`` the block digests of every head after the apply (``manifest``)."""
    blockdevs, exports = [], []
    for i, head in enumerate(heads):
        blockdevs += qcow2_node(head, f"h{i}")
        exports.append({"type": "nbd", "id": f"e{i}", "node-name": f"h{i}", "name": f"h{i}",
                        "writable": True})
    stats = {"records": 0, "bytes": 0}
    with StorageDaemon(run_dir, name, blockdevs, exports) as qsd:
        writers = []
        try:
            for i in range(len(heads)):
                writers.append(nbdio.Writer(nbdio.connect(qsd.nbd_socket, f"h{i}"), f"head {i}"))
            for rec in records:
                if rec.disk >= len(writers):
                    raise IntegrityError(f"record for disk index {rec.disk}; the replica has "
                                         f"{len(writers)} disk(s)")
                w = writers[rec.disk]
                if rec.kind == wire.Kind.DATA:
                    w.write(rec.offset, rec.payload)
                else:
                    w.zero(rec.offset, rec.length, trim=rec.kind == wire.Kind.TRIM)
                stats["records"] += 1
                stats["bytes"] += rec.length
            for w in writers:
                w.flush()
            if verify:
                stats["manifest"] = []
                for i in range(len(heads)):
                    h = nbdio.connect(qsd.nbd_socket, f"h{i}", ["base:allocation"])
                    try:
                        stats["manifest"].append([d.hex() for d in nbdio.manifest(h)])
                    finally:
                        nbdio.close(h)
        finally:
            for w in writers:
                nbdio.close(w.h)
    return stats
