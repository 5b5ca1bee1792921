"""qemu-storage-daemon's end: a daemon that does not quit is killed after a bound and
named (with where its threads wait); one killed by someone else is told apart."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import pytest

from vmreplica.errors import HypervisorError
from vmreplica.qemutools.qsd import QuitTimeout, StorageDaemon, qcow2_node


@pytest.fixture
def qsd(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    d = StorageDaemon(tmp_path / "run", "t", qcow2_node(img, "d0")).start()
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_a_daemon_that_does_not_quit_is_killed_within_the_bound(qsd, caplog):
    pid = qsd.proc.pid
    os.kill(pid, signal.SIGSTOP)               # it will never answer `quit`
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vmreplica.qsd"):
        with pytest.raises(QuitTimeout) as info:
            qsd.close(timeout=3)
    took = time.monotonic() - t0
    assert took < 6, took
    assert "did not exit within 3 s of quit and was killed" in info.value.message
    assert qsd.proc.returncode == -9
    assert not os.path.exists(f"/proc/{pid}/status") or \
        "zombie" in open(f"/proc/{pid}/status").read()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "its threads:" in warned and "[qemu-storage-d" in warned, warned


def test_a_daemon_killed_by_someone_else_is_told_apart(qsd):
    os.kill(qsd.proc.pid, signal.SIGKILL)
    qsd.proc.wait()
    with pytest.raises(HypervisorError) as info:
        qsd.close(timeout=3)
    assert not isinstance(info.value, QuitTimeout)
    assert "was killed by signal 9 (not by vmreplica)" in info.value.message


def test_a_clean_quit_raises_nothing(qsd):
    qsd.close(timeout=30)
    assert qsd.proc.returncode == 0
