"""img.repair (`qemu-img check -r all`), run on the heads before a staged cycle is
applied again at start-up: refcounts left behind the L2 tables (what a power cut left
when the heads ran without flushes, before issue 16) are rebuilt, and the data stays
readable."""

from __future__ import annotations

import struct
import subprocess

import pytest

from helpers import qemu_io
from vmreplica.errors import HypervisorError
from vmreplica.qemutools import img


def _zero_refcounts(path, first: int, count: int) -> None:
    """Refcounts of clusters ``first``.. set to 0 in the first refcount block (16-bit
    entries): what the disk holds when the L2 tables reached it and the refcounts did not."""
    with open(path, "r+b") as f:
        header = f.read(72)
        table = struct.unpack(">Q", header[48:56])[0]
        f.seek(table)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * first)
        f.write(b"\0" * 2 * count)


def test_refcounts_behind_the_l2_tables_are_rebuilt(tmp_path):
    head = tmp_path / "head.qcow2"
    img.create(head, 64 << 20)
    qemu_io(head, "write -P 7 0 4M")
    assert img.repair(head).get("corruptions-fixed", 0) == 0      # a clean image: nothing
    _zero_refcounts(head, 5, 64)
    check = subprocess.run(["qemu-img", "check", str(head)], capture_output=True, text=True)
    assert check.returncode == 2                                 # corrupt as left
    report = img.repair(head)
    assert report["corruptions-fixed"] > 0
    assert subprocess.run(["qemu-img", "check", str(head)], capture_output=True).returncode == 0
    qemu_io(head, "read -P 7 0 4M")                              # the data is intact
    qemu_io(head, "write -P 8 8M 4M")                            # and new clusters are not
    qemu_io(head, "read -P 7 0 4M", "read -P 8 8M 4M")          # handed out twice


def test_a_file_that_is_not_qcow2_is_an_error(tmp_path):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"not an image" * 100)
    with pytest.raises(HypervisorError, match="checking image"):
        img.repair(junk)
