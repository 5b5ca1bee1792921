"""Direct reads of an image at rest give exactly what QEMU's NBD export gives.

Every kind of extent a qcow2 can hold is read both ways and compared: plain data,
data in a backing file, a compressed cluster, a zero cluster, unallocated space, and
extents that straddle them; the reader reads from the file only what QEMU maps plainly
and leaves the rest to NBD. A qcow2 with an external data file is never read directly.
"""

from __future__ import annotations

import json
import subprocess
from itertools import pairwise

import pytest

from vmreplica.domain import extents as ex
from vmreplica.qemutools import imagemap, nbdio
from vmreplica.qemutools.buffers import BufferPool
from vmreplica.qemutools.qsd import StorageDaemon, qcow2_node

KiB, MiB = 1 << 10, 1 << 20


def _qemu_io(img, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [str(img)], check=True, capture_output=True)


@pytest.fixture(params=["compat=1.1", "compat=0.10", "cluster_size=4k", "cluster_size=2M",
                        "lazy_refcounts=on"])
def chain(tmp_path, request):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    _qemu_io(base, "write -P 0x11 0 4M", "write -P 0x12 8M 1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    "-o", request.param, str(top)], check=True)
    _qemu_io(top, "write -P 0x21 1M 1M", "write -P 0x22 3M 2M", "write -z 12M 1M",
             "write -P 0x23 20M 64k")
    # A compressed cluster (qemu-io -c writes compressed, whole clusters only).
    cluster = {"cluster_size=4k": "4k", "cluster_size=2M": "2M"}.get(request.param, "64k")
    _qemu_io(top, f"write -c -P 0x24 30M {cluster}")
    # Fragment the file: clusters of one guest run land far apart.
    _qemu_io(top, "write -P 0x25 40M 64k", "write -P 0x26 50M 64k", "write -P 0x27 40M 128k")
    return top


def _compat(img) -> str:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                     check=True, capture_output=True, text=True).stdout)
    return info["format-specific"]["data"]["compat"]


def _nbd_view(tmp_path, img, fmt="qcow2"):
    blockdevs = qcow2_node(img, "n", read_only=True) if fmt == "qcow2" else \
        [{"driver": "file", "filename": str(img), "node-name": "n-file", "read-only": True},
         {"driver": "raw", "file": "n-file", "node-name": "n", "read-only": True}]
    return StorageDaemon(tmp_path / "run", "m", blockdevs,
                         [{"type": "nbd", "id": "e", "node-name": "n", "name": "n"}]).start()


EXTENTS = [(0, 64 * KiB), (1 * MiB, 1 * MiB), (512 * KiB, 1 * MiB), (3 * MiB, 1 * MiB),
           (4 * MiB, 1 * MiB), (8 * MiB, 64 * KiB), (12 * MiB, 128 * KiB),
           (20 * MiB, 64 * KiB), (30 * MiB, 64 * KiB), (40 * MiB, 128 * KiB),
           (40 * MiB, 192 * KiB), (50 * MiB, 64 * KiB), (60 * MiB, 1 * MiB)]


def test_direct_reads_equal_the_nbd_export(tmp_path, chain, monkeypatch):
    monkeypatch.setattr(imagemap, "L2_CACHE", 2)     # tables are dropped and read again
    qsd = _nbd_view(tmp_path, chain)
    h = nbdio.connect(qsd.nbd_socket, "n")
    try:
        expected = [bytes(buf) for _, _, buf in nbdio.read_extents(h, EXTENTS)]
        reader = imagemap.open_image(str(chain), "qcow2")
        assert reader is not None
        cluster = reader.map.cluster
        pieces = reader.pieces(40 * MiB, 128 * KiB)
        asked: list = []

        def nbd_read(extents):
            asked.extend(extents)
            return nbdio.read_extents(h, extents)

        pool = BufferPool()
        got = list(imagemap.read_extents(reader, EXTENTS, nbd_read, pool=pool, batch=5))
        again = [reader.pieces(o, n) for o, n in reversed(EXTENTS)]   # out of order
        assert again[::-1] == [reader.pieces(o, n) for o, n in EXTENTS]
        reader.close()
    finally:
        nbdio.close(h)
        qsd.close()
    assert [(o, n) for o, n, _ in got] == EXTENTS
    assert [bytes(b) for _, _, b in got] == expected
    # What only the backing file, a compressed or a zero cluster holds went to NBD;
    # the top image's own data did not.
    if cluster <= 64 * KiB:                        # (a 2 MiB cluster copied them up)
        assert (0, 64 * KiB) in asked and (512 * KiB, 1 * MiB) in asked
    assert (30 * MiB, 64 * KiB) in asked
    if _compat(chain) != "0.10":                   # (v2 has no zero flag: zeros are data)
        assert (12 * MiB, 128 * KiB) in asked
    assert (1 * MiB, 1 * MiB) not in asked and (3 * MiB, 1 * MiB) not in asked
    assert (20 * MiB, 64 * KiB) not in asked
    if cluster <= 64 * KiB:
        assert (40 * MiB, 128 * KiB) not in asked
        assert (40 * MiB, 192 * KiB) in asked      # its last part is in no image
        assert len(pieces) >= 2                    # clusters far apart in the file


def test_a_raw_image_is_read_directly(tmp_path):
    img = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "16M"], check=True)
    _qemu_io(img, "write -P 0x31 1M 2M", fmt="raw")
    reader = imagemap.open_image(str(img), "raw")
    try:
        assert reader.pieces(1 * MiB, 2 * MiB) == [(1 * MiB, 2 * MiB)]
        out = list(imagemap.read_extents(reader, [(1 * MiB, 64 * KiB)],
                                         lambda rest: iter(()) if not rest else None))
    finally:
        reader.close()
    assert bytes(out[0][2]) == b"\x31" * 64 * KiB


def test_a_block_device_is_read_directly_to_its_end(tmp_path):
    """A raw block device (a loop device here, an LVM volume in use): its st_size is 0,
    its size is where it ends."""
    backing = tmp_path / "lv.img"
    subprocess.run(["truncate", "-s", "16M", str(backing)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        _qemu_io(dev, "write -P 0x51 15M 1M", fmt="raw")
        reader = imagemap.open_image(dev, "raw")
        try:
            assert reader.pieces(15 * MiB, 1 * MiB) == [(15 * MiB, 1 * MiB)]
            assert reader.pieces(15 * MiB, 2 * MiB) is None        # past its end
            out = list(imagemap.read_extents(reader, [(15 * MiB, 64 * KiB)],
                                             lambda rest: iter(()) if not rest else None))
        finally:
            reader.close()
        assert bytes(out[0][2]) == b"\x51" * 64 * KiB
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_extended_l2_entries_are_never_read_directly(tmp_path):
    img = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on",
                    str(img), "16M"], check=True)
    _qemu_io(img, "write -P 0x41 0 1M")
    assert imagemap.open_image(str(img), "qcow2") is None


def test_an_external_data_file_is_never_read_directly(tmp_path):
    img, data = tmp_path / "x.qcow2", tmp_path / "x.data"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={data}", str(img), "16M"], check=True)
    _qemu_io(img, "write -P 0x41 0 1M")
    assert imagemap.open_image(str(img), "qcow2") is None


@pytest.fixture(params=["compat=1.1", "compat=0.10", "cluster_size=4k", "cluster_size=2M",
                        "lazy_refcounts=on"])
def standalone(tmp_path, request):
    img = tmp_path / "solo.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", request.param,
                    str(img), "64M"], check=True)
    cluster = {"cluster_size=4k": "4k", "cluster_size=2M": "2M"}.get(request.param, "64k")
    _qemu_io(img, "write -P 0x21 1M 1M", "write -P 0x22 3M 2M", "write -z 12M 1M",
             "write -P 0x23 20M 64k", f"write -c -P 0x24 30M {cluster}",
             "write -P 0x25 40M 64k", "write -P 0x26 50M 64k", "write -P 0x27 40M 128k",
             "write -P 0x28 44M 2M", "discard 44M 1M", "write -P 0x00 56M 128k")
    return img


def test_allocation_from_the_tables_is_what_qemu_reports(tmp_path, standalone, monkeypatch):
    """A delta of an image at rest classifies its dirty extents from the image's tables
    (no base:allocation block status): the same holes and data as QEMU's view, where
    QEMU's "allocated but reads as zero" is data that reads as zeros (and goes as a
    ZERO record all the same)."""
    monkeypatch.setattr(imagemap, "L2_CACHE", 2)
    extents = ex.merge(sorted(EXTENTS + [(44 * MiB, 2 * MiB), (56 * MiB, 128 * KiB)]))
    qsd = _nbd_view(tmp_path, standalone)
    h = nbdio.connect(qsd.nbd_socket, "n", ["base:allocation"])
    reader = imagemap.open_image(str(standalone), "qcow2")
    try:
        assert reader is not None and reader.knows_allocation
        theirs = list(ex.classify(extents, nbdio.block_status(h, "base:allocation")))
        runs = reader.allocation(extents)
        assert runs is not None
        ours = list(ex.classify(extents, runs))
        for kind, off, ln in _pieces(ours, theirs):
            mine, qemus = kind
            if mine == qemus:
                continue
            # Only this difference is allowed: QEMU looked at the file and found a hole
            # under a data cluster; read, it is zeros.
            assert (mine, qemus) == (ex.DATA, ex.ZEROED), (off, ln, mine, qemus)
            data = next(nbdio.read_extents(h, [(off, ln)]))[2]
            assert bytes(data) == bytes(ln)
        assert any(k == ex.TRIMMED for k, _, _ in ours)       # holes were found
        assert any(k == ex.DATA for k, _, _ in ours)
    finally:
        reader.close()
        nbdio.close(h)
        qsd.close()


def _pieces(a, b):
    """Both classifications cut at each other's boundaries: ((kind_a, kind_b), off, len)."""
    cuts = sorted({o for _, o, _ in a} | {o + n for _, o, n in a} |
                  {o for _, o, _ in b} | {o + n for _, o, n in b})

    def kind_at(runs, pos):
        return next((k for k, o, n in runs if o <= pos < o + n), None)
    for lo, hi in pairwise(cuts):
        ka, kb = kind_at(a, lo), kind_at(b, lo)
        if ka is not None or kb is not None:
            yield (ka, kb), lo, hi - lo


def test_a_backing_file_leaves_allocation_to_qemu(chain):
    """Where the backing file decides (an unallocated cluster of the top image), the
    tables cannot say it: the caller asks QEMU. Zero clusters say it themselves."""
    reader = imagemap.open_image(str(chain), "qcow2")
    try:
        assert not reader.knows_allocation
        assert reader.allocation([(8 * MiB, 64 * KiB)]) is None     # the base's data
        if reader.map.cluster <= 64 * KiB:
            assert reader.allocation([(1 * MiB, 1 * MiB)]) == [(1 * MiB, 1 * MiB, 0)]
    finally:
        reader.close()
