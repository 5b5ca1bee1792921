"""The cycle wire format: round trips, and every kind of corruption is an IntegrityError."""

from __future__ import annotations

import io
import os

import pytest

from vmreplica.errors import IntegrityError
from vmreplica.qemutools.buffers import BufferPool
from vmreplica.transport import wire


def _stream(compression="zstd", records=None):
    w = wire.CycleWriter({"vm": "v", "cycle": 3, "disks": ["disk0", "disk1"]}, compression)
    out = [w.begin()]
    for kind, disk, off, data in records or [
        ("data", 0, 0, b"a" * 65536),
        ("data", 1, 1 << 20, os.urandom(4096)),
        ("zero", 0, 1 << 30, 1 << 20),
        ("trim", 1, 0, 512),
    ]:
        if kind == "data":
            out.append(w.data(disk, off, data))
        else:
            out.append(w.zero(disk, off, data, trim=kind == "trim"))
    out.append(w.end({"cycle": 3}))
    return b"".join(out), w


def _read(blob, pool=None):
    r = wire.CycleReader(io.BytesIO(blob).read, pool=pool)
    return r, r.read_all()


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_round_trip(compression, pooled):
    blob, w = _stream(compression)
    r, recs = _read(blob, BufferPool() if pooled else None)
    assert r.header["cycle"] == 3 and r.trailer["records"] == 4
    assert [(x.kind, x.disk, x.offset, x.length) for x in recs] == [
        (wire.Kind.DATA, 0, 0, 65536), (wire.Kind.DATA, 1, 1 << 20, 4096),
        (wire.Kind.ZERO, 0, 1 << 30, 1 << 20), (wire.Kind.TRIM, 1, 0, 512)]
    assert recs[0].payload == b"a" * 65536
    assert w.raw_bytes == 65536 + 4096 and w.zero_bytes == (1 << 20) + 512
    if compression == "zstd":
        assert w.wire_bytes < 20000  # the 64 KiB of 'a' compresses


def test_incompressible_data_is_sent_plain_and_skipped_for_a_while():
    recs = [("data", 0, i * 65536, os.urandom(65536)) for i in range(10)]
    blob, w = _stream("zstd", recs)
    _r, out = _read(blob)
    assert [x.payload for x in out] == [d for *_, d in recs]
    assert w.wire_bytes > 10 * 65536


def test_every_byte_flip_is_detected():
    blob, _ = _stream("none", [("data", 0, 0, bytes(range(256)) * 16), ("zero", 0, 8192, 512)])
    _read(blob)  # intact: fine
    for pos in range(0, len(blob), 7):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            _read(bytes(bad))


def test_truncation_anywhere_is_detected():
    blob, _ = _stream()
    for cut in range(0, len(blob) - 1, max(1, len(blob) // 97)):
        with pytest.raises(IntegrityError):
            _read(blob[:cut])


def test_reordered_or_repeated_records_are_detected():
    w = wire.CycleWriter({"cycle": 1}, "none")
    head = w.begin()
    r1 = w.data(0, 0, b"x" * 512)
    r2 = w.data(0, 512, b"y" * 512)
    end = w.end({})
    with pytest.raises(IntegrityError, match="digest"):
        _read(head + r2 + r1 + end)
    with pytest.raises(IntegrityError):
        _read(head + r1 + r1 + end)


def test_bad_magic_version_and_limits():
    blob, _ = _stream()
    with pytest.raises(IntegrityError, match="magic"):
        _read(b"XXXX" + blob[4:])
    with pytest.raises(IntegrityError, match="version"):
        _read(blob[:4] + b"\x09" + blob[5:])
    w = wire.CycleWriter({}, "none")
    head = w.begin()
    frame = wire.FRAME.pack(wire.Kind.DATA, 0, 0, 3, 512, 512, bytes(32))  # unaligned
    with pytest.raises(IntegrityError, match="invalid extent"):
        _read(head + frame + b"z" * 512)


@pytest.mark.parametrize("actual", [65536 + 512, 65536 - 512, 1])
def test_a_zstd_record_that_does_not_fill_its_extent_exactly_is_rejected(actual):
    """Decompressing into a pooled buffer of the extent's size: a frame that holds more
    or less than the extent is an error, never a short or truncated write."""
    import zstandard
    from blake3 import blake3
    data = b"x" * actual
    packed = zstandard.ZstdCompressor(level=1).compress(data)
    head = b"{}"
    blob = (wire.PREAMBLE.pack(wire.MAGIC, wire.VERSION, len(head)) + head +
            wire.FRAME.pack(wire.Kind.DATA, wire.Codec.ZSTD, 0, 0, 65536, len(packed),
                            blake3(data[:65536]).digest()) + packed)
    for pool in (None, BufferPool()):
        with pytest.raises(IntegrityError, match="decompress"):
            _read(blob, pool)


def test_a_corrupt_zstd_payload_is_rejected_with_the_pool():
    blob, _ = _stream("zstd", [("data", 0, 0, bytes(range(256)) * 256)])
    r, _ = _read(blob, BufferPool())
    start = len(r.head_bytes) + wire.FRAME.size
    plen = wire.FRAME.unpack(blob[start - wire.FRAME.size:start])[5]
    assert 0 < plen < 65536
    for pos in range(start, start + plen):               # every byte of the compressed payload
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            _read(bytes(bad), BufferPool())


def test_buffer_pool_reuses_within_its_limit_and_a_returned_view_is_dead():
    pool = BufferPool(limit=256 << 10)
    a = pool.get(65536)
    a[:3] = b"abc"
    under = a.obj
    pool.put(a)
    with pytest.raises(ValueError):
        a[0]                                   # a view given back cannot be used again
    b = pool.get(40000)                        # the same 64 KiB class: the same memory
    assert b.obj is under and len(b) == 40000 and pool.kept == 0
    c = pool.get(300 << 10)                    # 512 KiB class: above the limit when back
    pool.put(b)
    pool.put(c)
    assert pool.kept == 65536
    pool.put(memoryview(bytearray(65536)))     # any bytearray of a class size is kept too
    pool.put(b"bytes")                         # anything else is ignored
    assert pool.kept == 131072


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_data_that_reads_as_zero_travels_as_a_zero_record(compression):
    blob, w = _stream(compression, [("data", 0, 0, bytes(65536)),
                                    ("data", 0, 65536, b"\0" * 4095 + b"\1")])
    r, recs = _read(blob)
    assert [(x.kind, x.offset, x.length) for x in recs] == [
        (wire.Kind.ZERO, 0, 65536), (wire.Kind.DATA, 65536, 4096)]
    assert recs[0].payload is None and recs[1].payload == b"\0" * 4095 + b"\1"
    assert w.zero_bytes == 65536 and w.raw_bytes == 4096
    assert r.trailer["records"] == 2
