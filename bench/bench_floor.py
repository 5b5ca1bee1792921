"""Where a delta cycle's time can go: each stage of the data path measured alone, in this
process, on the issue-2 scenario (8 GiB qcow2, 1,024 scattered 64 KiB qemu-io writes =
64 MiB), so a `vmreplica sync` figure from bench_cycle.py can be read against what its
parts cost on this machine.

Stages (each run ``--rounds`` times, median printed):
  read      qemu-storage-daemon export, the 1,024 extents over NBD, 16 in flight
  read-direct  the same extents from the image file at the offsets its L2 tables give
            (qemutools/imagemap: how the primary reads a powered-off VM's image)
  encode    BLAKE3 + zstd + framing of those 64 MiB (the primary's CycleWriter)
  tls       the encoded stream through TLS over loopback (a sender and a receiver thread)
  decode    parse, zstd, BLAKE3 check of the stream (the replica's CycleReader)
  write     the 1,024 records into a fresh 8 GiB qcow2 head over NBD, opened as a head
            server opens it (qsd.qcow2_node), then its flush
  touch     first write to 64 MiB of newly mapped memory, against the same memory reused
            (what buffers allocated afresh for every cycle would cost on this machine;
            the daemons reuse theirs: qemutools/buffers.py)

It ends with the sum of the stages (everything in a row) and the overlapped figure the
cycle's design allows (read+encode beside tls+decode, then write), both without the
CLI, the daemon's API and the bitmap freeze, which bench_cycle.py shows separately.
"""

from __future__ import annotations

import argparse
import mmap
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vmreplica.qemutools import imagemap, nbdio
from vmreplica.qemutools.qsd import StorageDaemon, qcow2_node
from vmreplica.transport import tls, wire

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def image(work: Path, seed: int) -> tuple[Path, list[tuple[int, int]]]:
    img = work / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8G"], check=True)
    offs = sorted(random.Random(seed).sample(range(8 * GiB // (64 * KiB)), 1024))
    cmds = []
    for i, o in enumerate(offs):
        cmds += ["-c", f"write -P {i % 250 + 1} {o * 64 * KiB} {64 * KiB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True, capture_output=True)
    return img, [(o * 64 * KiB, 64 * KiB) for o in offs]


def stage_read(work: Path, img: Path, extents) -> tuple[float, list]:
    qsd = StorageDaemon(work, "src", qcow2_node(img, "n", read_only=True),
                        [{"type": "nbd", "id": "e", "node-name": "n", "name": "n"}]).start()
    try:
        h = nbdio.connect(qsd.nbd_socket, "n")
        t = time.perf_counter()
        bufs = [(off, buf) for off, _, buf in nbdio.read_extents(h, extents)]
        took = time.perf_counter() - t
        nbdio.close(h)
    finally:
        qsd.close()
    return took, bufs


def stage_read_direct(img: Path, extents) -> float:
    """As the primary reads an image at rest (the storage daemon that would hold its
    bitmaps is not needed to read it)."""
    t = time.perf_counter()
    reader = imagemap.open_image(str(img), "qcow2")
    assert reader is not None
    n = sum(1 for _ in imagemap.read_extents(reader, extents, lambda rest: iter(())))
    took = time.perf_counter() - t
    reader.close()
    assert n == len(extents)
    return took


def stage_encode(bufs) -> tuple[float, bytes]:
    t = time.perf_counter()
    w = wire.CycleWriter({"bench": True})
    parts = [w.begin()]
    for off, data in bufs:
        frame, payload = w.data_frame(0, off, data)
        parts += (frame, payload)
    parts.append(w.end({}))
    stream = b"".join(parts)
    return time.perf_counter() - t, stream


def stage_tls(work: Path, stream: bytes) -> float:
    key, cert = work / "k.pem", work / "c.pem"
    if not cert.exists():
        tls.generate_identity("bench", key, cert)
    sctx = tls.server_context(cert, key, [])
    cctx = tls.client_context(None, None, None)
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    got, ready = [], threading.Event()

    def serve():
        conn, _ = ls.accept()
        with sctx.wrap_socket(conn, server_side=True) as s:
            ready.set()
            n, buf = 0, bytearray(1 << 20)
            while n < len(stream):
                k = s.recv_into(buf)
                if not k:
                    break
                n += k
            got.append(n)

    th = threading.Thread(target=serve)
    th.start()
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # as http.client does
    with cctx.wrap_socket(raw) as c:
        c.do_handshake()
        ready.wait()
        t = time.perf_counter()
        view = memoryview(stream)
        for i in range(0, len(stream), 1 << 20):
            c.sendall(view[i:i + (1 << 20)])
        th.join()
        took = time.perf_counter() - t
    ls.close()
    assert got == [len(stream)], got
    return took


def stage_decode(stream: bytes) -> float:
    import io
    t = time.perf_counter()     # (zstd and BLAKE3 from memory, as the staged stream)
    r = wire.CycleReader(io.BytesIO(stream).read)
    n = sum(1 for _ in r.records())
    assert n == 1024
    return time.perf_counter() - t


def stage_write(work: Path, bufs) -> float:
    head = work / "head.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(head), "8G"], check=True)
    qsd = StorageDaemon(work, "head", qcow2_node(head, "n"),
                        [{"type": "nbd", "id": "e", "node-name": "n", "name": "n",
                          "writable": True}]).start()
    try:
        h = nbdio.connect(qsd.nbd_socket, "n")
        w = nbdio.Writer(h, "head")
        t = time.perf_counter()
        for off, data in bufs:
            w.write(off, data)
        w.flush()
        took = time.perf_counter() - t
        nbdio.close(h)
    finally:
        qsd.close()
        head.unlink()
    return took


def stage_touch() -> tuple[float, float]:
    fresh = mmap.mmap(-1, 64 * MiB)
    t = time.perf_counter()
    for i in range(0, 64 * MiB, 4096):
        fresh[i] = 1
    first = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, 64 * MiB, 4096):
        fresh[i] = 2
    again = time.perf_counter() - t
    fresh.close()
    return first, again


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmr-floor-", dir="/tmp"))
    try:
        figures: dict[str, list[float]] = {}
        for r in range(args.rounds):
            img, extents = image(work, r)
            took, bufs = stage_read(work, img, extents)
            figures.setdefault("read", []).append(took)
            figures.setdefault("read-direct", []).append(stage_read_direct(img, extents))
            took, stream = stage_encode(bufs)
            figures.setdefault("encode", []).append(took)
            figures.setdefault("tls", []).append(stage_tls(work, stream))
            figures.setdefault("decode", []).append(stage_decode(stream))
            figures.setdefault("write", []).append(stage_write(work, bufs))
            first, again = stage_touch()
            figures.setdefault("touch-fresh", []).append(first)
            figures.setdefault("touch-reused", []).append(again)
            img.unlink()
        med = {k: statistics.median(v) for k, v in figures.items()}
        for k, v in med.items():
            print(f"{k:13} {v:.3f} s   (rounds: {' '.join(f'{x:.3f}' for x in figures[k])})")
        read = med["read-direct"]          # a powered-off VM's image, as bench_cycle's
        serial = read + med["encode"] + med["tls"] + med["decode"] + med["write"]
        overlapped = max(read + med["encode"], med["tls"] + med["decode"]) + med["write"]
        print(f"all stages in a row {serial:.3f} s; overlapped as a cycle runs {overlapped:.3f} s "
              "(reading directly; add the CLI, the API and the freeze from bench_cycle.py)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
