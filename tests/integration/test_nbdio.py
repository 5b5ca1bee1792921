"""Data through libnbd is not kept: a daemon moves gigabytes a day through these calls.

libnbd 1.14's Python bindings keep every ``nbd.Buffer`` given to ``aio_pread`` or
``aio_pwrite`` alive for ever; nbdio gives them plain buffers. Before that a replica
daemon held all 2 GiB of an initial copy it had applied, and a primary all it had read.
"""

from __future__ import annotations

import gc
import os
import subprocess

import pytest

from vmreplica.qemutools import nbdio
from vmreplica.qemutools.qsd import StorageDaemon, qcow2_node

MiB = 1 << 20


def _rss() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


@pytest.fixture
def export(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "512M"], check=True)
    d = StorageDaemon(tmp_path / "run", "t", qcow2_node(img, "n"),
                      [{"type": "nbd", "id": "e", "node-name": "n", "name": "n",
                        "writable": True}]).start()
    h = nbdio.connect(d.nbd_socket, "n")
    yield h
    nbdio.close(h)
    d.close()


def test_written_and_read_data_is_not_kept(export):
    h = export
    pattern = os.urandom(MiB)
    before = _rss()
    w = nbdio.Writer(h, "test export")
    for i in range(256):
        w.write(i * MiB, bytearray(pattern))      # a new buffer each time, as a cycle's
    w.flush()
    after_writes = _rss()
    # 256 MiB went each way; what stays is allocator slack, not the data.
    assert after_writes - before < 64 * MiB, f"writes kept {(after_writes - before) >> 20} MiB"
    seen = 0
    for off, ln, buf in nbdio.read_extents(h, [(i * MiB, MiB) for i in range(256)]):
        assert buf == pattern, f"read back differs at {off}"
        assert not nbdio.is_zero(buf) and nbdio.is_zero(bytearray(ln))
        seen += ln
    after_reads = _rss()
    assert seen == 256 * MiB
    assert after_reads - after_writes < 64 * MiB, \
        f"reads kept {(after_reads - after_writes) >> 20} MiB"
