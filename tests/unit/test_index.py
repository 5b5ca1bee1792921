"""The replica's hash index: what a cycle's records leave in it is what reading the head
would give (a whole block's digest taken from the record's verified checksum is the same
as hashing the block again)."""

from __future__ import annotations

import io
import os

from blake3 import blake3

from vmreplica.replica import index as rindex
from vmreplica.tracking import scan
from vmreplica.transport import wire

B, D = scan.BLOCK, scan.DIGEST


def test_index_digests_match_the_blocks(tmp_path):
    size = 64 * B
    one = os.urandom(B)                    # one aligned block: digest from the wire check
    big = os.urandom(4 * B)                # four blocks in one record: hashed per block
    part = os.urandom(B // 2)              # half a block: unknown until read
    w = wire.CycleWriter({"disks": ["d"]}, "zstd")
    blob = b"".join([w.begin(), w.data(0, 3 * B, one), w.data(0, 8 * B, big),
                     w.data(0, 20 * B, part), w.zero(0, 30 * B, 2 * B),
                     w.end({})])
    r = wire.CycleReader(io.BytesIO(blob).read)
    path = tmp_path / "d.index"
    rindex.init(path, size)
    idx = rindex.IndexWriter([path], [size])
    for rec in r.records():
        idx.record(rec)
    idx.close()
    got = rindex.read(path)
    digest = lambda i: got[i * D:(i + 1) * D]          # noqa: E731
    assert digest(3) == blake3(one).digest(D)
    for k in range(4):
        assert digest(8 + k) == blake3(big[k * B:(k + 1) * B]).digest(D)
    assert digest(20) == rindex.UNKNOWN
    assert digest(30) == digest(31) == digest(0) == scan.zero_digest(B)
