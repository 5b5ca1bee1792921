"""The storage daemon the block sessions of powered-off VMs share (qemutools.atrest,
issue 20), with real qemu-storage-daemon and qcow2 images: one daemon for many sessions
of several VMs, at once too; each session's end closes its images in it — flushed,
bitmaps stored and not "in use" on disk while the daemon still runs, so a power cut
between two cycles finds every image closed; a daemon killed mid-session is replaced
at the next session; idle, it quits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmreplica.errors import HypervisorError
from vmreplica.qemutools import qmpsteps
from vmreplica.qemutools.atrest import AtRestDaemon
from vmreplica.qemutools.qsd import image_node, reap


def _image(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def _bitmaps_on_disk(path: Path) -> dict[str, list[str]]:
    """What the image file says of its bitmaps (qemu-img -U: read while a daemon runs)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bitmaps}


@pytest.fixture
def daemon(tmp_path):
    d = AtRestDaemon(tmp_path / "run", idle_close=60)
    yield d
    d.close()


def test_sessions_share_one_daemon_and_leave_their_images_closed(tmp_path, daemon):
    a, b = _image(tmp_path, "a"), _image(tmp_path, "b")
    for k in range(3):
        for owner, path in (("vm-a", a), ("vm-b", b)):
            images = daemon.attach(owner, image_node(path, f"v{owner}-d0", "qcow2"))
            qmpsteps.transaction(images, [qmpsteps.bitmap_add(f"v{owner}-d0", f"b{k}")])
            images.close()
            # closed in the daemon, which runs on: the bitmap is on disk, not in use
            assert _bitmaps_on_disk(path)[f"b{k}"] == ["auto"], _bitmaps_on_disk(path)
            assert daemon.pid is not None
    assert daemon.started == 1


def test_sessions_of_several_vms_at_once(tmp_path, daemon):
    paths = {f"vm{i}": _image(tmp_path, f"vm{i}") for i in range(4)}
    errors: list[Exception] = []

    def run(owner: str) -> None:
        try:
            for k in range(8):
                node = f"v{owner}-d0"
                images = daemon.attach(owner, image_node(paths[owner], node, "qcow2"))
                try:
                    # (as a cycle does: start the new bitmap, stop and export the old)
                    qmpsteps.transaction(images, [qmpsteps.bitmap_add(node, f"b{k}")] + (
                        [qmpsteps.bitmap_disable(node, f"b{k-1}")] if k else []))
                    if k:
                        qmpsteps.export_view(images, f"exp-{node}", node, node, f"b{k-1}")
                        qmpsteps.drop_exports(images, [f"exp-{node}"], _Log())
                        qmpsteps.transaction(images, [qmpsteps.bitmap_remove(node, f"b{k-1}")])
                finally:
                    images.close()
        except Exception as e:  # noqa: BLE001 — reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(o,)) for o in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert daemon.started == 1
    for path in paths.values():
        assert _bitmaps_on_disk(path) == {"b7": ["auto"]}


class _Log:
    def warning(self, *args) -> None:
        raise AssertionError(args)


def test_a_killed_daemon_fails_its_session_clearly_and_the_next_starts_another(tmp_path,
                                                                               daemon):
    path = _image(tmp_path, "a")
    images = daemon.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))
    os.kill(daemon.pid, signal.SIGKILL)
    with pytest.raises(HypervisorError):
        qmpsteps.transaction(images, [qmpsteps.bitmap_add("vvm-a-d0", "x")])
    images.close()                                   # nothing left to close: no error
    images = daemon.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))
    qmpsteps.transaction(images, [qmpsteps.bitmap_add("vvm-a-d0", "y")])
    images.close()
    assert daemon.started == 2
    assert _bitmaps_on_disk(path) == {"y": ["auto"]}


def test_an_idle_daemon_quits_and_a_busy_one_does_not(tmp_path, daemon):
    path = _image(tmp_path, "a")
    images = daemon.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))
    pid = daemon.pid
    assert not daemon.close_idle(now=1e12)           # an image is open: kept
    images.close()
    assert not daemon.close_idle()                   # idle for less than idle_close
    assert daemon.close_idle(now=1e12)
    assert daemon.pid is None and not Path(f"/proc/{pid}").exists()


def test_one_a_dead_vmreplica_daemon_left_is_reaped(tmp_path):
    """The next vmreplica daemon stops it at start (qsd.reap), by its pid file."""
    d = AtRestDaemon(tmp_path / "run")
    path = _image(tmp_path, "a")
    images = d.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))
    qmpsteps.transaction(images, [qmpsteps.bitmap_add("vvm-a-d0", "kept")])
    pid = d.pid
    # (its parent is this test, not init: collect it as it ends, or it lingers a zombie)
    assert d._qsd is not None and d._qsd.proc is not None
    threading.Thread(target=d._qsd.proc.wait, daemon=True).start()
    assert reap(tmp_path / "run") == [pid]
    # SIGTERM: it stored the bitmap of the image it had open
    assert _bitmaps_on_disk(path) == {"kept": ["auto"]}
    d._qsd = None                                    # (that process is gone)


def test_an_image_another_process_holds_is_asked_for_again_then_refused_clearly(tmp_path,
                                                                                daemon):
    """A tool holding a powered-off VM's image (here qemu-io, as the scale benchmark's
    writer) for a moment costs the session a short wait, not the cycle; one that keeps
    it is named."""
    path = _image(tmp_path, "a")
    # qemu-io holds the image's write lock while it sleeps (1.0 s: inside the retries)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 1000", str(path)])
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        images = daemon.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))
        assert 0.4 < time.monotonic() - t0 < 3.0
        images.close()
    finally:
        holder.wait(10)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 6000", str(path)])
    try:
        time.sleep(0.3)
        with pytest.raises(HypervisorError) as info:
            daemon.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))
        assert "held by another process" in info.value.message, info.value.message
        assert "next cycle tries again" in (info.value.hint or "")
    finally:
        holder.kill()
        holder.wait()
    images = daemon.attach("vm-a", image_node(path, "vvm-a-d0", "qcow2"))   # free again
    images.close()
    assert daemon.started == 1


def test_a_dead_daemons_files_are_swept_at_start_and_the_live_ones_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("atrest-1.nbd", "atrest-1.qmp", "atrest-77.err", "0a1b2c3d.nbd"):
        (run / name).write_text("")
    d = AtRestDaemon(run)
    images = d.attach("vm-a", image_node(_image(tmp_path, "a"), "vvm-a-d0", "qcow2"))
    try:
        gone = sorted(p.name for p in d.sweep_stale())
        assert gone == ["atrest-1.nbd", "atrest-1.qmp", "atrest-77.err"]
        assert (run / "0a1b2c3d.nbd").exists()            # (a running VM's: not ours)
        assert (run / f"atrest-{os.getpid()}.nbd").exists()
    finally:
        images.close()
        d.close()
