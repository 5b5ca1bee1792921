"""Head servers write O_DIRECT only where the file system takes it (and fall back to the
page cache elsewhere), never through QEMU's preallocate filter (it loses data, see
qsd.qcow2_node); a node without flush (no head server opens one since issue 16, the
crash-state harness does) leaves the fdatasync to its caller."""

from __future__ import annotations

from pathlib import Path

from vmreplica.qemutools.qsd import io_uring_works, qcow2_node
from vmreplica.replica.heads import direct_io_works, write_log_stem


def test_o_direct_is_used_only_where_the_file_system_takes_it(tmp_path):
    f = tmp_path / "head.qcow2"
    f.write_bytes(b"\0" * 4096)
    assert direct_io_works(str(f)) is True          # ext4 here
    assert direct_io_works("/proc/version") is False  # procfs refuses O_DIRECT
    assert direct_io_works(str(tmp_path / "missing")) is False


def test_a_head_node_stack():
    nodes = qcow2_node("/x/head.qcow2", "h0", direct=True)
    assert [n["driver"] for n in nodes] == ["file", "qcow2"]
    assert nodes[0]["cache"] == {"direct": True} and nodes[0]["aio"] == "native"
    assert nodes[1]["file"] == "h0-file"
    plain = qcow2_node("/x/base.qcow2", "b", read_only=True)
    assert [n["driver"] for n in plain] == ["file", "qcow2"] and "cache" not in plain[0]


def test_a_buffered_head_node_takes_the_aio_it_is_given_a_direct_one_native():
    """A delta's heads (buffered) use io_uring where QEMU can (HeadServer asks
    io_uring_works); an O_DIRECT head keeps native AIO whatever is asked."""
    assert qcow2_node("/x/head.qcow2", "h0", aio="io_uring")[0]["aio"] == "io_uring"
    assert "aio" not in qcow2_node("/x/head.qcow2", "h0")[0]           # QEMU's threads
    assert qcow2_node("/x/head.qcow2", "h0", direct=True, aio="io_uring")[0]["aio"] == "native"


def test_io_uring_is_asked_of_this_qemu_once():
    """The answer is what qemu-img says of aio=io_uring on this kernel (Debian 12's QEMU
    is built with liburing; the tests run as root, so only io_uring_disabled=2 refuses
    it), and it is cached."""
    sysctl = Path("/proc/sys/kernel/io_uring_disabled")
    allowed = not sysctl.exists() or sysctl.read_text().strip() != "2"
    io_uring_works.cache_clear()
    assert io_uring_works() is allowed
    assert io_uring_works.cache_info().misses == 1 and io_uring_works() is io_uring_works()
    assert io_uring_works.cache_info().hits >= 1


def test_a_head_node_without_flush_leaves_the_fdatasync_to_the_caller():
    buffered = qcow2_node("/x/head.qcow2", "h0", flush=False)
    assert buffered[0]["cache"] == {"no-flush": True} and "aio" not in buffered[0]
    both = qcow2_node("/x/head.qcow2", "h0", direct=True, flush=False)
    assert both[0]["cache"] == {"direct": True, "no-flush": True}
    # A read-only node has nothing to flush either way.
    assert "cache" not in qcow2_node("/x/b.qcow2", "b", read_only=True, flush=False)[0]


def test_two_disks_heads_do_not_share_a_write_log():
    # Both disks' heads are called layer-NNNNNN.qcow2: the log names their disk too.
    assert write_log_stem("/s/web/disk0/layer-000001.qcow2") == "disk0.layer-000001.qcow2"
    assert write_log_stem("/s/web/disk1/layer-000001.qcow2") != \
        write_log_stem("/s/web/disk0/layer-000001.qcow2")
