"""Property tests of the cycle wire format (issue 16): streams the writer builds round-trip;
any truncation, bit flip, inserted byte or random input fed to the reader ends in the
project's own error (never IndexError, struct.error, KeyError, a zstd error, RecursionError
or MemoryError), and every DATA record it hands out before that was verified; declared
lengths, however large, do not make it allocate what they claim."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmreplica.errors import IntegrityError, VmreplicaError
from vmreplica.qemutools.buffers import BufferPool
from vmreplica.transport import wire

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL = settings(FUZZ, max_examples=60)


# -- building valid streams ------------------------------------------------------------
_sectors = st.integers(min_value=1, max_value=16).map(lambda n: n * 512)
_data = st.one_of(
    st.binary(min_size=1, max_size=64).flatmap(          # compressible: a short pattern
        lambda p: _sectors.map(lambda n: (p * (n // len(p) + 1))[:n])),
    _sectors.flatmap(lambda n: st.binary(min_size=n, max_size=n)),   # noise
    _sectors.map(bytes),                                             # reads as zeros
)
_record = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 2), st.integers(0, 1 << 20), _data),
    st.tuples(st.sampled_from(["zero", "trim"]), st.integers(0, 2), st.integers(0, 1 << 20),
              st.integers(1, 1 << 13).map(lambda n: n * 512)),
)
_header = st.fixed_dictionaries(
    {"vm": st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
     "relationship": st.text(alphabet="0123456789abcdef", min_size=1, max_size=32),
     "epoch": st.integers(0, wire.MAX_INT), "cycle": st.integers(0, wire.MAX_INT),
     "initial": st.booleans(), "verify": st.booleans(),
     "disks": st.just(["disk0", "disk1", "disk2"]),
     "freeze_time": st.one_of(st.none(), st.floats(0, 2e9))})
_streams = st.tuples(_header, st.lists(_record, max_size=8), st.sampled_from(["zstd", "none"]),
                     st.one_of(st.none(), st.sampled_from(["crash", "app"])), st.booleans())


def build(header, records, compression, point=None, final=False):
    w = wire.CycleWriter(header, compression)
    out = [w.begin()]
    for kind, disk, sector, arg in records:
        if kind == "data":
            out.append(w.data(disk, sector * 512, arg))
        else:
            out.append(w.zero(disk, sector * 512, arg, trim=kind == "trim"))
    out.append(w.end({"cycle": header["cycle"], "epoch": header["epoch"], "point": point,
                      "final": final, "freeze_time": header["freeze_time"],
                      "initial": header["initial"]}))
    return b"".join(out)


def expected(records):
    out = []
    for kind, disk, sector, arg in records:
        if kind == "data" and any(arg):
            out.append((wire.Kind.DATA, disk, sector * 512, len(arg), bytes(arg)))
        elif kind == "data":
            out.append((wire.Kind.ZERO, disk, sector * 512, len(arg), None))
        else:
            out.append((wire.Kind.TRIM if kind == "trim" else wire.Kind.ZERO, disk, sector * 512,
                        arg, None))
    return out


def consume(blob: bytes, pool=None):
    """Read ``blob`` to its end: (records handed out, the error that ended it or None).
    Only the project's errors may end it; every DATA record handed out must carry a
    payload whose BLAKE3 is its check."""
    reader = wire.CycleReader(io.BytesIO(blob).read, pool=pool)
    got = []
    try:
        for rec in reader.records():
            if rec.kind == wire.Kind.DATA:
                assert rec.payload is not None and len(rec.payload) == rec.length
                assert blake3(rec.payload).digest() == rec.check, "unverified record"
            else:
                assert rec.payload is None
            got.append((rec.kind, rec.disk, rec.offset, rec.length,
                        None if rec.payload is None else bytes(rec.payload)))
    except VmreplicaError as e:
        return reader, got, e
    # (any other exception propagates and fails the test)
    return reader, got, None


@FUZZ
@given(_streams, st.booleans())
def test_valid_streams_round_trip(stream, pooled):
    header, records, compression, point, final = stream
    blob = build(header, records, compression, point, final)
    reader, got, err = consume(blob, BufferPool() if pooled else None)
    assert err is None, err
    assert got == expected(records)
    assert reader.header == header
    assert reader.trailer["point"] == point and reader.trailer["final"] is final
    assert reader.trailer["records"] == len(records)
    assert reader.bytes_read == len(blob)


@FUZZ
@given(_streams, st.data())
def test_any_truncation_is_an_integrity_error(stream, data):
    blob = build(*stream)
    cut = data.draw(st.integers(0, len(blob) - 1))
    _, got, err = consume(blob[:cut])
    assert isinstance(err, IntegrityError), err
    assert got == expected(stream[1])[:len(got)]       # what came out before was intact


@FUZZ
@given(_streams, st.data(), st.booleans())
def test_any_bit_flip_is_an_integrity_error(stream, data, pooled):
    blob = bytearray(build(*stream))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    _, _, err = consume(bytes(blob), BufferPool() if pooled else None)
    assert isinstance(err, IntegrityError), err


@FUZZ
@given(_streams, st.data())
def test_any_inserted_bytes_are_an_integrity_error(stream, data):
    """Anywhere, the end included: a stream that goes on after its trailer is refused too."""
    blob = build(*stream)
    pos = data.draw(st.integers(0, len(blob)))
    extra = data.draw(st.binary(min_size=1, max_size=8))
    _, _, err = consume(blob[:pos] + extra + blob[pos:])
    assert isinstance(err, IntegrityError), err


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_are_refused(blob, pooled):
    _, got, err = consume(blob, BufferPool() if pooled else None)
    assert isinstance(err, IntegrityError), err
    assert got == []


def _preamble(header: bytes = b"{}") -> bytes:
    return wire.PREAMBLE.pack(wire.MAGIC, wire.VERSION, len(header)) + header


@FUZZ
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 32 - 1),
       st.binary(max_size=64), st.booleans())
def test_random_frames_after_a_valid_header(kind, codec, disk, offset, length, plen, tail, pooled):
    """Whatever a frame declares (a 16 EiB extent, a 4 GiB payload), the reader refuses it
    with an IntegrityError without allocating anything near what it claims."""
    blob = _preamble() + wire.FRAME.pack(kind, codec, disk, offset, length, plen,
                                         bytes(32)) + tail
    tracemalloc.start()
    try:
        _, _, err = consume(blob, BufferPool() if pooled else None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(err, IntegrityError), err
    assert peak < 1 << 20, f"{peak} bytes allocated for a {len(blob)}-byte stream"


@SMALL
@given(st.integers(0, 2 ** 32 - 1), st.binary(max_size=32))
def test_a_huge_declared_header_length_allocates_nothing_like_it(hlen, tail):
    blob = wire.PREAMBLE.pack(wire.MAGIC, wire.VERSION, hlen) + tail
    tracemalloc.start()
    try:
        _, _, err = consume(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(err, IntegrityError)
    assert peak < 1 << 20


# -- JSON in the header and the trailer ------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_fields = st.dictionaries(st.sampled_from(sorted(set(wire.HEADER_FIELDS) | set(wire.TRAILER_FIELDS))),
                          _json, max_size=6)


_EMPTY = b'{"raw_bytes": 0, "records": 0, "zero_bytes": 0}'


def raw_stream(header: bytes = b"{}", trailer: bytes = _EMPTY) -> bytes:
    """A stream without records whose header and trailer bytes are ours, its digest right."""
    pre = _preamble(header)
    digest = blake3(pre + trailer).digest()
    return pre + wire.FRAME.pack(wire.Kind.END, 0, 0, 0, 0, len(trailer), digest) + trailer


@FUZZ
@given(st.one_of(_json, _fields), st.booleans())
def test_any_json_header_is_accepted_only_with_the_right_types(value, as_trailer):
    if as_trailer and isinstance(value, dict):
        value = dict(value, records=0, raw_bytes=0, zero_bytes=0)
    body = json.dumps(value).encode()
    blob = raw_stream(trailer=body) if as_trailer else raw_stream(header=body)
    reader, _, err = consume(blob)
    if err is None:                        # accepted: every field the replica reads is sane
        got = reader.trailer if as_trailer else reader.header
        fields = wire.TRAILER_FIELDS if as_trailer else wire.HEADER_FIELDS
        assert isinstance(got, dict)
        for key in ("cycle", "epoch", "records"):
            if key in got and key in fields:
                assert type(got[key]) is int and 0 <= got[key] <= wire.MAX_INT
        if "disks" in got and not as_trailer:
            assert all(isinstance(d, str) for d in got["disks"])
    else:
        assert isinstance(err, IntegrityError)


def test_the_raw_streams_of_these_tests_are_valid():
    reader, got, err = consume(raw_stream(b'{"cycle": 3, "epoch": 2, "disks": ["a"]}'))
    assert err is None and got == [] and reader.header["cycle"] == 3


_MALFORMED = [b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b"7", b"\"x\"", b"\xff\xfe{}",
              b'{"cycle": ' + b"9" * 5000 + b"}", b'{"epoch": [1]}', b'{"cycle": -1}',
              b'{"cycle": 1e400}', b'{"cycle": 18446744073709551616}', b'{"freeze_time": NaN}',
              b'{"epoch": true}']


@pytest.mark.parametrize("where,body", [("header", b) for b in _MALFORMED + [b'{"disks": "disk0"}',
                                                                          b'{"disks": [1]}']]
                         + [("trailer", b) for b in _MALFORMED + [b'{"records": "0"}', b'{"point": 5}']])
def test_malformed_json_is_an_integrity_error(where, body):
    """Found by the fuzzing: a trailer that was not an object raised AttributeError, JSON
    nested too deep RecursionError, and a cycle number beyond SQLite's INTEGER or a list
    for an epoch reached the receiver (OverflowError / TypeError, HTTP 500)."""
    if where == "trailer" and body.startswith(b"{"):
        body = b'{"records": 0, "raw_bytes": 0, "zero_bytes": 0, ' + body[1:]
    blob = raw_stream(trailer=body) if where == "trailer" else raw_stream(header=body)
    _, _, err = consume(blob)
    assert isinstance(err, IntegrityError), err


# -- zstd frames that claim more than their extent ----------------------------------------
def _rle_frame(content: int, declare: int | None = None) -> bytes:
    """A zstd frame of ``content`` zero bytes in RLE blocks (4 bytes per 128 KiB), its
    header declaring ``declare`` bytes (single segment: the window is that size)."""
    blocks, left = [], content
    while left:
        n = min(left, 128 << 10)
        left -= n
        blocks.append(((0 if left else 1) | 1 << 1 | n << 3).to_bytes(3, "little") + b"\0")
    size = content if declare is None else declare
    return b"\x28\xb5\x2f\xfd" + bytes([0b11100000]) + struct.pack("<Q", size) + b"".join(blocks)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("declared,content", [(256 << 20, 256 << 20), (1 << 40, 1 << 20),
                                              (1 << 33, 4 << 20)])
def test_a_zstd_bomb_does_not_allocate_what_it_declares(pooled, declared, content):
    """Found by the fuzzing: without a pool (reader_for_file: a staged cycle, an imported
    seed) the reader used ZstdDecompressor.decompress, which allocates and fills what the
    frame header declares: a 32 KiB payload in a 1 MiB record made it touch 256 MiB (1 GiB,
    or a MemoryError, for larger claims). Now it decompresses into a buffer of the
    extent's size and the window is bounded."""
    length = 1 << 20
    bomb = _rle_frame(content, declared)
    w = wire.CycleWriter({}, "zstd")
    frame = wire.FRAME.pack(wire.Kind.DATA, wire.Codec.ZSTD, 0, 0, length, len(bomb),
                            blake3(bytes(length)).digest())
    w._digest.update(frame)
    blob = w.begin() + frame + bomb
    tracemalloc.start()
    try:
        _, _, err = consume(blob, BufferPool() if pooled else None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(err, IntegrityError), err
    assert peak < 8 * length, f"{peak >> 20} MiB allocated for a {len(bomb)}-byte payload"


def test_a_genuine_large_zstd_record_still_decompresses_without_the_pool():
    data = (b"0123456789abcdef" * 4096) * 256            # 16 MiB, compressible
    blob = build({"vm": "v", "relationship": "r", "epoch": 1, "cycle": 1, "initial": False,
                  "verify": False, "disks": ["d"], "freeze_time": None},
                 [("data", 0, 0, data)], "zstd")
    assert len(blob) < len(data) // 10
    for pool in (None, BufferPool()):
        _, got, err = consume(blob, pool)
        assert err is None and got[0][4] == data


def test_a_tls_error_in_the_middle_of_a_body_is_a_transport_error_not_an_internal_one():
    """A byte changed on the way fails the TLS record's check (ssl.SSLError) while the
    replica reads a cycle: the request is refused like a cut connection (found by the
    fault soak: it was logged as an internal error with a traceback)."""
    import ssl

    from vmreplica import errors
    from vmreplica.transport.http import BodyReader

    class Broken:
        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]")
            return b"x" * min(n, 10)

        def readline(self, n):
            raise ConnectionResetError(104, "Connection reset by peer")

    body = BodyReader(Broken(), {"Content-Length": "100"})
    assert body.read(10) == b"x" * 10
    with pytest.raises(errors.TransportError, match="BAD_RECORD_MAC"):
        body.read(10)
    assert body.read(10) == b""
    chunked = BodyReader(Broken(), {"Transfer-Encoding": "chunked"})
    with pytest.raises(errors.TransportError, match="reset"):
        chunked.read(10)
