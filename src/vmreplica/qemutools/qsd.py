"""qemu-storage-daemon: serve images over NBD (and QMP) without a VM.

Used to read a powered-off VM's disks with their persistent dirty bitmaps, and to write
into a replica head. Closed with QMP ``quit`` so persistent bitmaps are stored cleanly
(a killed daemon leaves them marked in-use, which the tracker treats as a break).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from ..errors import HypervisorError
from . import spawn
from .qmp import Monitor

log = logging.getLogger("vmreplica.qsd")


def _threads(pid: int) -> str:
    """What each thread of ``pid`` waits in (name, state, wchan, syscall, and the top of
    its kernel stack where readable): for a stuck process."""
    out = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task")):
            t = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{t}/comm") as f:
                    comm = f.read().strip()
                with open(f"{t}/wchan") as f:
                    wchan = f.read().strip()
                with open(f"{t}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"{t}/syscall") as f:
                    call = f.read().split()[0]
            except OSError:
                continue
            try:
                with open(f"{t}/stack") as f:
                    stack = ",".join(ln.split()[-1].split("+")[0] for ln in f.read().splitlines()[:4])
            except OSError:
                stack = ""
            out.append(f"{tid}[{comm}]:{state}/{wchan or '-'}/sys{call}" +
                       (f"/{stack}" if stack else ""))
    except OSError as e:
        return f"unknown ({e})"
    return " ".join(out)


class QuitTimeout(HypervisorError):
    """A storage daemon did not exit after ``quit`` and was killed: whatever it had not
    stored (persistent bitmaps) is lost; the data it served was never at risk (flushed)."""


def _explain(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "no message"
    if "lock" in last.lower():
        return f"{last} (is the VM running, or another vmreplica operation using the disk?)"
    return last


SLOW_QUIT = 5.0      # a quit that takes longer is logged with where its threads wait


class StorageDaemon:
    def __init__(self, run_dir: Path, name: str, blockdevs: list[dict],
                 exports: list[dict] | None = None, nbd: bool = True,
                 objects: list[str] | None = None, nbd_server: str | None = None,
                 death_signal: str = "SIGTERM"):
        self.run_dir = Path(run_dir)
        self.name = name
        self.blockdevs = blockdevs
        self.exports = list(exports or [])
        self.objects = list(objects or [])
        self.nbd_server = nbd_server     # e.g. TCP with TLS, instead of the unix socket
        self.death_signal = death_signal  # what it gets when the daemon that started it dies
        self.qmp_socket = self.run_dir / f"{name}.qmp"
        self.nbd_socket = self.run_dir / f"{name}.nbd" if nbd else None
        self.err_path = self.run_dir / f"{name}.err"
        self.pid_path = self.run_dir / f"{name}.qsd.pid"
        self.proc: subprocess.Popen | None = None
        self.qmp: Monitor | None = None
        self._killed = False             # kill() ended it (on purpose)

    def start(self) -> Self:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for p in (self.qmp_socket, self.nbd_socket):
            if p is not None:
                p.unlink(missing_ok=True)
        # If the daemon that started it dies, the storage daemon gets SIGTERM and exits
        # cleanly (flushing, storing bitmaps) instead of holding the images locked.
        args = ["setpriv", "--pdeathsig", self.death_signal, "--", "qemu-storage-daemon",
                "--pidfile", str(self.pid_path)]
        for obj in self.objects:
            args += ["--object", obj]
        for bd in self.blockdevs:
            args += ["--blockdev", json.dumps(bd)]
        if self.nbd_server:
            args += ["--nbd-server", self.nbd_server]
        elif self.nbd_socket is not None:
            args += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for ex in self.exports:
            args += ["--export", json.dumps(ex)]
        # The monitor connects to us (a client-mode chardev, to a socket we listen on):
        # QEMU sets a QMP monitor up in its I/O thread, and a client that connected to a
        # listening monitor while that was under way could be set up twice — a stress run
        # of off-VM cycles saw, about once in a thousand starts, two greetings on one
        # connection, our commands' bytes reordered ("xeecute"), replies to other
        # commands, a `quit` never acted on (CI's rare "quit hangs") and the main loop
        # blocked in accept(). A connection made before the monitor exists has none of it.
        args += ["--chardev", f"socket,id=mon,path={self.qmp_socket},server=off",
                 "--monitor", "chardev=mon"]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.qmp_socket))
        listener.listen(1)
        err = open(self.err_path, "w")  # noqa: SIM115 — closed in the finally
        try:
            self.proc = spawn.popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    close_fds=True)
        except FileNotFoundError:
            listener.close()
            raise HypervisorError("qemu-storage-daemon is not installed",
                                  hint="run `make setup`") from None
        finally:
            err.close()
        deadline = time.monotonic() + 30
        try:
            try:
                conn = self._accept_monitor(listener, deadline)
            finally:
                listener.close()
                self.qmp_socket.unlink(missing_ok=True)
            self.qmp = Monitor(self.qmp_socket, timeout=60, sock=conn)
            # Ready once the pid file is written: after every chardev, export and NBD
            # server is set up (a documented order). Looked for every 0.3 ms: it comes
            # 1-2 ms after the monitor connects, and every cycle of a VM at rest starts
            # a daemon (polling every 2 ms lost a millisecond of each on average).
            while not self._pid_written():
                self._still_starting(deadline)
                time.sleep(0.0003)
        except HypervisorError:
            self.kill()
            raise
        return self

    def _accept_monitor(self, listener: socket.socket, deadline: float) -> socket.socket:
        listener.settimeout(0.05)
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                self._still_starting(deadline)

    def _still_starting(self, deadline: float) -> None:
        assert self.proc is not None                # (start: the process is there)
        if self.proc.poll() is not None:
            raise HypervisorError(f"qemu-storage-daemon failed: {_explain(self._stderr())}")
        if time.monotonic() > deadline:
            raise HypervisorError("qemu-storage-daemon did not start within 30 s")

    def _pid_written(self) -> bool:
        assert self.proc is not None                # (start: the process is there)
        try:
            return int(self.pid_path.read_text().strip() or 0) == self.proc.pid
        except (OSError, ValueError):
            return False

    def _stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""

    def add_nbd_export(self, node: str, name: str, writable: bool = False,
                       bitmaps: list[str] | None = None) -> None:
        args = {"type": "nbd", "id": f"exp-{name}", "node-name": node, "name": name,
                "writable": writable}
        if bitmaps:
            args["bitmaps"] = bitmaps
        assert self.qmp is not None, "the storage daemon is not started"
        self.qmp.execute("block-export-add", args)

    def close(self, timeout: float = 60.0) -> None:
        """Quit cleanly (flush, store persistent bitmaps); kill only if it does not stop
        (a kill loses the bitmaps it had not stored, which costs a resynchronisation:
        generous, a busy disk flushes slowly, but a hung daemon is not waited for long,
        it holds the VM's lock). Raises QuitTimeout after a kill."""
        if self.proc is None:
            return
        start = time.monotonic()

        def left(until: float) -> float:
            return max(0.0, start + until - time.monotonic())
        if self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=min(10.0, timeout))
            except HypervisorError:
                self.proc.terminate()
        if self.qmp is not None:
            self.qmp.close()
        try:
            try:
                self.proc.wait(left(min(SLOW_QUIT, timeout)))
            except subprocess.TimeoutExpired:
                if not left(timeout):
                    raise
                # Rare: say where it waits while it still waits (a kill would hide it),
                # then ask again with SIGTERM, which it handles like `quit` (bitmaps
                # stored): a stress run caught one idle in its main loop, as if the quit
                # had never arrived, that SIGTERM ended at once.
                log.warning("qemu-storage-daemon %s (pid %d) still running %.0f s after quit; "
                            "its threads: %s; sending SIGTERM", self.name, self.proc.pid,
                            SLOW_QUIT, _threads(self.proc.pid))
                self.proc.terminate()
                self.proc.wait(left(timeout))
        except subprocess.TimeoutExpired as e:
            # Record where it is stuck before killing it.
            log.warning("qemu-storage-daemon %s (pid %d) did not exit within %.0f s of quit; "
                        "its threads: %s", self.name, self.proc.pid, timeout,
                        _threads(self.proc.pid))
            self.kill()
            raise QuitTimeout(f"qemu-storage-daemon {self.name} did not exit within "
                              f"{timeout:.0f} s of quit and was killed") from e
        rc = self.proc.returncode
        self._cleanup()
        if self._killed:
            return              # (killed on purpose earlier: kill())
        if rc is not None and rc < 0 and rc != -15:
            raise HypervisorError(f"qemu-storage-daemon {self.name} was killed by signal "
                                  f"{-rc} (not by vmreplica): {_explain(self._stderr())}")
        if rc not in (0, None, -15):
            raise HypervisorError(f"qemu-storage-daemon exited with {rc}: {_explain(self._stderr())}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._killed = True
            self.proc.kill()
            self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self.qmp_socket, self.nbd_socket, self.err_path, self.pid_path):
            if p is not None:
                try:
                    os.unlink(p)
                except OSError:
                    pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except HypervisorError:
                pass
        return False


def reap(run_dir: Path, timeout: float = 15.0) -> list[int]:
    """Stop storage daemons a previous daemon left running (found by their pid files)."""
    stopped = []
    for pid_path in Path(run_dir).glob("*.qsd.pid"):
        try:
            pid = int(pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            # The very process that wrote this pid file, not another one that reuses the pid.
            alive = b"qemu-storage-daemon" in cmdline and str(pid_path).encode() in cmdline
        except (OSError, ValueError):
            alive = False
        if alive:
            os.kill(pid, 15)  # SIGTERM: a clean exit that stores persistent bitmaps
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.02)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, 9)
            stopped.append(pid)
        stem = pid_path.name[: -len(".qsd.pid")]
        for ext in (".qmp", ".nbd", ".err", ".qsd.pid"):
            (Path(run_dir) / f"{stem}{ext}").unlink(missing_ok=True)
    return stopped


@functools.cache
def io_uring_works() -> bool:
    """Whether QEMU here opens a file with ``aio=io_uring`` (built with liburing, on a
    kernel that allows it: ``kernel.io_uring_disabled``). Asked once, of qemu-img."""
    with tempfile.NamedTemporaryFile(prefix="vmr-aio-") as f:
        f.truncate(4096)
        proc = subprocess.run(["qemu-img", "info", "--image-opts",
                               f"driver=file,filename={f.name},aio=io_uring"],
                              capture_output=True, text=True, timeout=60)
    if proc.returncode:
        log.info("aio=io_uring is not available here (%s): buffered head writes use "
                 "QEMU's thread pool", proc.stderr.strip())
    return proc.returncode == 0


def qcow2_node(path: Path | str, node: str, read_only: bool = False,
               backing: str | None | bool = True,
               direct: bool = False, flush: bool = True,
               write_log: str | None = None, aio: str | None = None) -> list[dict]:
    """The blockdevs (file + qcow2) that open ``path`` as node ``node``.

    No ``preallocate`` filter: QEMU 7.2's (Debian 12) loses data when concurrent writes
    cross the end it extended the file to. Measured here (40 MiB of 1 MiB writes in
    random order into a new qcow2, 8 in flight, read back): different data in 5 of 6
    runs with a 1 MiB step on ext4, in 1 of 6 with a 4 MiB step on tmpfs; none in 6
    runs without the filter. The head servers used it with QEMU's 128 MiB step (commit
    e348bca, when heads were not flushed: 0.06 s instead of 0.11-0.18 s per 1,024
    scattered 64 KiB writes into a new layer). With the flush the heads have now, its
    gain is in the noise (bench/bench_floor.py's write stage, medians of 5: 0.133 and
    0.140 s with it, 0.144 and 0.147 s without), and its 128 MiB of zeroes per head,
    kept by a killed daemon, filled issue 16's long soak's replica storage.

    With ``direct`` the file is opened O_DIRECT (``cache.direct``, Linux native AIO): no
    copy into the page cache and nothing left dirty for the flush (see heads.py).
    Otherwise ``aio`` chooses how the file's buffered I/O is done (None: QEMU's thread
    pool; ``io_uring``: io_uring_works).

    Without ``flush`` a flush request writes qcow2's cached metadata into the file but
    does not fdatasync it (``cache.no-flush``). That also voids qcow2's own write order
    (it flushes between dependent metadata writes), so a power cut can leave the image
    corrupt: no product path uses it since issue 16 (heads.HeadServer); the crash-state
    harness (tests/crashstates.py) uses it to show what it breaks.

    With ``write_log`` (an existing, empty file; tests only) QEMU's ``blklogwrites``
    filter sits right under the qcow2 node and records every write, zero write and
    discard qcow2 sends to its file, and every flush that reaches the disk, in
    dm-log-writes format (512-byte log sectors, see tests/crashstates.py): what a power
    cut could have kept of them is rebuilt from it. Without ``flush`` the filter takes
    ``cache.no-flush`` too, so no flush is logged: none reached the disk."""
    file_node = {"driver": "file", "filename": str(path), "node-name": f"{node}-file",
                 "read-only": read_only}
    cache = {}
    if direct:
        cache["direct"] = True
        file_node["aio"] = "native"
    elif aio:
        file_node["aio"] = aio
    if not flush and not read_only:
        cache["no-flush"] = True
    if cache:
        file_node["cache"] = cache
    nodes = [file_node]
    child = f"{node}-file"
    if write_log and not read_only:
        nodes.append({"driver": "file", "filename": str(write_log),
                      "node-name": f"{node}-wlog"})
        logged = {"driver": "blklogwrites", "node-name": f"{node}-logged", "file": child,
                  "log": f"{node}-wlog", "log-sector-size": 512}
        if not flush:
            logged["cache"] = {"no-flush": True}
        nodes.append(logged)
        child = f"{node}-logged"
    fmt = {"driver": "qcow2", "file": child, "node-name": node, "read-only": read_only}
    if backing is None:
        fmt["backing"] = None
    elif isinstance(backing, str):
        fmt["backing"] = backing
    return nodes + [fmt]


def image_node(path: Path | str, node: str, fmt: str, read_only: bool = False) -> list[dict]:
    """The blockdevs that open a VM's disk image ``path`` (``fmt`` qcow2 or raw) as node
    ``node`` (a qcow2 with qcow2_node's defaults): a block session's storage daemon over
    a powered-off VM's disks. A block device (an LVM volume, a loop device) is opened
    with QEMU's ``host_device`` driver; ``read_only`` for a disk that is only read (its
    lock still keeps a VM from opening it for writing meanwhile)."""
    if fmt == "qcow2" and not is_block_device(path):
        return qcow2_node(path, node, read_only=read_only)
    proto = "host_device" if is_block_device(path) else "file"
    return [{"driver": proto, "filename": str(path), "node-name": f"{node}-file",
             "read-only": read_only},
            {"driver": fmt, "file": f"{node}-file", "node-name": node, "read-only": read_only}]


def is_block_device(path: Path | str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
