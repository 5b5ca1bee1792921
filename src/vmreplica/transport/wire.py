"""The cycle wire format (version 1): one stream of framed records per replication cycle.

    stream  := MAGIC "VMRC" · VERSION u8 · HLEN u32 · HEADER (JSON, HLEN bytes) · record* · end
    record  := FRAME · payload (PLEN bytes)
    FRAME   := kind u8 · codec u8 · disk u16 · offset u64 · length u64 · PLEN u32 · check 32 B
    end     := FRAME(kind=END, PLEN=len(TRAILER), check=stream digest) · TRAILER (JSON)

All integers big-endian. ``kind`` is DATA (payload = the bytes, maybe compressed),
ZERO (reads as zeros, no payload) or TRIM (unallocated at the source, no payload).
``codec`` is NONE or ZSTD. ``check`` of a DATA record is the BLAKE3 digest of the
uncompressed bytes, computed from the frozen source; of ZERO/TRIM records it is zero.
The stream digest is BLAKE3 over the header, every FRAME in order and the trailer, so a dropped,
repeated, reordered or altered record fails the cycle even if each record is intact.
The trailer repeats the totals (records, bytes) and the cycle's identity.
Documented in docs/wire-format.md; every violation raises ``IntegrityError``.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ..errors import IntegrityError

if TYPE_CHECKING:
    import zstandard

MAGIC = b"VMRC"
VERSION = 1
FRAME = struct.Struct(">BBHQQI32s")
PREAMBLE = struct.Struct(">4sBI")
MAX_HEADER = 1 << 20
MAX_RECORD = 64 << 20
ZERO_CHECK = bytes(32)
MAX_INT = (1 << 63) - 1     # cycle numbers and epochs go into SQLite INTEGER columns

# The fields of the header and the trailer the replica reads, and the JSON types each may
# have (when present). A stream whose fields have other types is rejected as malformed
# here, so the code that uses them never meets a list where it expects an epoch.
_INT, _NUM, _STR, _BOOL, _NONE = "int", "number", "str", "bool", "null"
HEADER_FIELDS = {"vm": (_STR,), "relationship": (_STR,), "epoch": (_INT,), "cycle": (_INT,),
                 "initial": (_BOOL,), "resync": (_BOOL,), "verify": (_BOOL,),
                 "primary": (_STR,), "id": (_STR,), "freeze_time": (_NUM, _NONE),
                 "disks": ("list[str]",)}
TRAILER_FIELDS = {"cycle": (_INT,), "epoch": (_INT,), "freeze_time": (_NUM, _NONE),
                  "initial": (_BOOL,), "final": (_BOOL,), "point": (_STR, _NONE),
                  "records": (_INT,), "raw_bytes": (_INT,), "zero_bytes": (_INT,),
                  # the VM's UEFI variables (primary.cycle.read_nvram), when it has any
                  "nvram_hash": (_STR,), "nvram": (_STR,)}


def _has_type(value, kind: str) -> bool:
    if kind == _INT:
        return type(value) is int and 0 <= value <= MAX_INT
    if kind == _NUM:
        import math
        return type(value) in (int, float) and math.isfinite(value)
    if kind == _STR:
        return isinstance(value, str) and "\0" not in value
    if kind == _BOOL:
        return type(value) is bool
    if kind == _NONE:
        return value is None
    if kind == "list[str]":
        return isinstance(value, list) and all(_has_type(v, _STR) for v in value)
    raise AssertionError(kind)


def _parse_json(body: bytes, fields: dict, what: str) -> dict:
    """``body`` as a JSON object whose known ``fields`` have their types."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):       # RecursionError: nested too deep
        raise IntegrityError(f"the cycle {what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"the cycle {what} is not a JSON object")
    for key, kinds in fields.items():
        if key in data and not any(_has_type(data[key], k) for k in kinds):
            raise IntegrityError(f"the cycle {what} is malformed: {key} is "
                                 f"{json.dumps(data[key])[:40]}, not a {' or '.join(kinds)}")
    return data


class Kind(enum.IntEnum):
    DATA = 1
    ZERO = 2
    TRIM = 3
    END = 0xFF


class Codec(enum.IntEnum):
    NONE = 0
    ZSTD = 1


def _blake3():
    from blake3 import blake3
    return blake3


_ZERO_CHECKS: dict[int, bytes] = {}


def zero_check(n: int) -> bytes:
    """The BLAKE3 digest of ``n`` zero bytes (cached by length)."""
    check = _ZERO_CHECKS.get(n)
    if check is None:
        check = _ZERO_CHECKS[n] = _blake3()(bytes(n)).digest()
    return check


class CycleWriter:
    """Builds the bytes of one cycle stream; counts what it wrote."""

    def __init__(self, header: dict, compression: str = "zstd", level: int = 1):
        self.header = header
        self._hash = _blake3()
        self._digest = self._hash()
        self._zstd: zstandard.ZstdCompressor | None = None
        if compression == "zstd":
            import zstandard
            self._zstd = zstandard.ZstdCompressor(level=level)
        self._skip = 0          # records left to send without trying to compress
        self._misses = 0        # consecutive records that did not compress
        self.records = 0
        self.raw_bytes = 0      # guest bytes covered by DATA records
        self.zero_bytes = 0     # guest bytes covered by ZERO/TRIM records
        self.wire_bytes = 0

    def _out(self, b: bytes) -> bytes:
        self.wire_bytes += len(b)
        return b

    def begin(self) -> bytes:
        head = json.dumps(self.header, sort_keys=True).encode()
        pre = PREAMBLE.pack(MAGIC, VERSION, len(head)) + head
        self._digest.update(pre)
        return self._out(pre)

    def data_frame(self, disk: int, offset: int,
                   data) -> tuple[bytes, bytes | bytearray | memoryview | None]:
        """(frame, payload) for a DATA record; the payload may be ``data`` itself.

        Data that reads as zero becomes a ZERO record, ``(frame, None)``: its digest,
        computed for the check anyway, is that of zero bytes (a separate zero test of
        every extent cost the primary 7 ms per 64 MiB)."""
        check = self._hash(data).digest()
        if check == zero_check(len(data)):
            return self.zero(disk, offset, len(data)), None
        payload, codec = data, Codec.NONE
        if self._zstd is not None:
            if self._skip:
                self._skip -= 1
            else:
                packed = self._zstd.compress(data)
                if len(packed) < len(data) * 0.97:
                    payload, codec = packed, Codec.ZSTD
                    self._misses = 0
                else:
                    # Incompressible data (encrypted, media): stop trying for a while.
                    self._misses += 1
                    if self._misses >= 4:
                        self._skip, self._misses = 32, 0
        frame = FRAME.pack(Kind.DATA, codec, disk, offset, len(data), len(payload), check)
        self._digest.update(frame)
        self.records += 1
        self.raw_bytes += len(data)
        self.wire_bytes += len(frame) + len(payload)
        return frame, payload

    def data(self, disk: int, offset: int, data) -> bytes:
        frame, payload = self.data_frame(disk, offset, data)
        return frame if payload is None else frame + bytes(payload)

    def zero(self, disk: int, offset: int, length: int, trim: bool = False) -> bytes:
        frame = FRAME.pack(Kind.TRIM if trim else Kind.ZERO, Codec.NONE, disk, offset, length, 0,
                           ZERO_CHECK)
        self._digest.update(frame)
        self.records += 1
        self.zero_bytes += length
        return self._out(frame)

    def end(self, info: dict) -> bytes:
        trailer = dict(info, records=self.records, raw_bytes=self.raw_bytes,
                       zero_bytes=self.zero_bytes)
        body = json.dumps(trailer, sort_keys=True).encode()
        self._digest.update(body)
        frame = FRAME.pack(Kind.END, Codec.NONE, 0, 0, 0, len(body), self._digest.digest())
        return self._out(frame + body)


@dataclass
class Record:
    kind: Kind
    disk: int
    offset: int
    length: int
    payload: bytes | None = None  # uncompressed and verified, DATA only
    check: bytes | None = None    # the verified BLAKE3 digest of ``payload`` (32 bytes)

    def data(self) -> bytes:
        return self.payload if self.payload is not None else b""


class CycleReader:
    """Parses and verifies a cycle stream read from ``read(n)`` (a file or a socket stream).

    ``header`` is available after ``start()``; ``records()`` yields verified records;
    ``trailer`` is set once the end frame has been read and checked.
    """

    def __init__(self, read: Callable[[int], bytes], pool=None):
        self._read = read
        self._pool = pool       # a buffers.BufferPool: records are decompressed into it
        self._hash = _blake3()
        self._digest = self._hash()
        self._zstd: zstandard.ZstdDecompressor | None = None
        self.header: dict | None = None
        self.head_bytes = b""   # preamble + header exactly as received
        self.trailer: dict | None = None
        self.records_seen = 0
        self.bytes_read = 0     # bytes of the stream read so far (what came over the wire)
        self.raw_bytes = 0
        self.zero_bytes = 0

    def _exact(self, n: int, what: str) -> bytes:
        parts, need = [], n
        while need:
            piece = self._read(need)
            if not piece:
                raise IntegrityError(f"the cycle stream ended in the middle of {what}")
            parts.append(piece)
            need -= len(piece)
        self.bytes_read += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def start(self) -> dict:
        pre = self._exact(PREAMBLE.size, "the preamble")
        magic, version, hlen = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise IntegrityError("this is not a vmreplica cycle stream (bad magic)")
        if version != VERSION:
            raise IntegrityError(f"unsupported cycle stream version {version} (this host "
                                 f"speaks {VERSION})", hint="run the same vmreplica version "
                                                            "on both hosts")
        if hlen > MAX_HEADER:
            raise IntegrityError(f"cycle header too large ({hlen} bytes)")
        head = self._exact(hlen, "the header")
        self.head_bytes = pre + head
        self._digest.update(self.head_bytes)
        header = _parse_json(head, HEADER_FIELDS, "header")
        self.header = header
        return header

    def records(self) -> Iterator[Record]:
        if self.header is None:
            self.start()
        while True:
            frame = self._exact(FRAME.size, "a record frame")
            kind, codec, disk, offset, length, plen, check = FRAME.unpack(frame)
            n = self.records_seen
            if kind == Kind.END:
                if codec or disk or offset or length or plen > MAX_HEADER:
                    raise IntegrityError("malformed end of the cycle stream")
                body = self._exact(plen, "the trailer")
                self._digest.update(body)
                if check != self._digest.digest():
                    raise IntegrityError("cycle stream digest mismatch: records were lost, "
                                         "reordered or altered in transit")
                self._finish(body)
                if self._read(1):
                    raise IntegrityError("the cycle stream goes on after its end")
                return
            self._digest.update(frame)
            if kind not in (Kind.DATA, Kind.ZERO, Kind.TRIM) or codec not in (0, 1):
                raise IntegrityError(f"record {n}: unknown kind {kind} or codec {codec}")
            if length == 0 or length > MAX_RECORD or offset % 512 or length % 512:
                raise IntegrityError(f"record {n}: invalid extent {offset}+{length}")
            self.records_seen += 1
            if kind != Kind.DATA:
                if plen:
                    raise IntegrityError(f"record {n}: a zero record carries a payload")
                self.zero_bytes += length
                yield Record(Kind(kind), disk, offset, length)
                continue
            if plen > length + (length >> 7) + 1024:
                raise IntegrityError(f"record {n}: payload larger than its extent")
            payload = self._exact(plen, f"record {n}")
            if codec == Codec.ZSTD:
                payload = self._decompress(payload, length, n)
            elif plen != length:
                raise IntegrityError(f"record {n}: payload length {plen} != extent {length}")
            if self._hash(payload).digest() != check:
                raise IntegrityError(f"record {n} (disk {disk}, offset {offset}): checksum "
                                     "mismatch; the cycle is rejected")
            self.raw_bytes += length
            yield Record(Kind.DATA, disk, offset, length, payload, check)

    def _decompress(self, payload: bytes, length: int, n: int):
        """``payload`` decompressed into a buffer of exactly ``length`` bytes (from the
        pool if there is one). Never more: ``ZstdDecompressor.decompress`` allocates (and
        fills) what the frame header claims, whatever ``max_output_size`` says, so a 32 KiB
        frame that declares a GiB took a GiB of memory; the stream reader writes into our
        buffer, and the window a frame may ask for is bounded by the largest record."""
        if self._zstd is None:
            import zstandard
            self._zstd = zstandard.ZstdDecompressor(max_window_size=MAX_RECORD)
        try:
            out = self._pool.get(length) if self._pool is not None else bytearray(length)
            view = out if isinstance(out, memoryview) else memoryview(out)
            stream = self._zstd.stream_reader(payload, read_across_frames=False)
            got = 0
            while got < length:             # readinto may stop at a block's end
                step = stream.readinto(view[got:])
                if not step:
                    break
                got += step
            if got == length and stream.read(1):
                got = length + 1              # more than the extent holds
        except Exception as e:  # noqa: BLE001 — zstandard.ZstdError and friends
            raise IntegrityError(f"record {n}: payload does not decompress: {e}") from None
        if got != length:
            what = f"more than {length}" if got > length else str(got)
            raise IntegrityError(f"record {n}: decompressed to {what} bytes, expected {length}")
        return out

    def _finish(self, body: bytes) -> None:
        trailer = _parse_json(body, TRAILER_FIELDS, "trailer")
        if (trailer.get("records") != self.records_seen
                or trailer.get("raw_bytes") != self.raw_bytes
                or trailer.get("zero_bytes") != self.zero_bytes):
            raise IntegrityError("cycle totals do not match the records received")
        self.trailer = trailer

    def read_all(self) -> list[Record]:
        return list(self.records())


def reader_for_file(f: BinaryIO) -> CycleReader:
    return CycleReader(f.read)
