"""Helpers for tests: qemu-io writes, image comparison, replica pairs."""

from __future__ import annotations

import subprocess
import time

from harness import lab


def qemu_io(path, *commands: str, force_share: bool = False) -> str:
    args = ["qemu-io", "-f", "qcow2"] + (["-U"] if force_share else [])
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run(args + [str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


def images_identical(a, b) -> tuple[bool, str]:
    proc = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                          text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def replicated_pairs(primary: lab.LabHost, replica: lab.LabHost, vm: str):
    """[(primary disk path, replica head path)] of a replicated VM."""
    p = {d["name"]: d["path"] for d in primary.vm(vm)["disks"]}
    r = {d["name"]: d["path"] for d in replica.vm(vm)["disks"]}
    return [(p[n], r[n]) for n in r]


def assert_replica_equals(primary, replica, vm):
    for src, head in replicated_pairs(primary, replica, vm):
        same, msg = images_identical(src, head)
        assert same, f"{src} != {head}: {msg}"


class CuttingProxy:
    """A TCP relay in front of a host's replication port that can cut the connection
    after a given number of bytes from the client (a network failure mid-cycle)."""

    def __init__(self, target_port: int):
        import socket
        import threading
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.cut_after: int | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, cut_after: int) -> None:
        self.cut_after = cut_after

    def _accept(self):
        import socket
        import threading
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            budget = [self.cut_after]
            threading.Thread(target=self._pump, args=(client, server, budget, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, budget, False),
                             daemon=True).start()

    def _pump(self, src, dst, budget, upstream: bool):
        import socket
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and budget[0] is not None:
                    if len(data) >= budget[0]:
                        dst.sendall(data[:budget[0]])
                        with self._lock:
                            self.cuts += 1
                            self.cut_after = None
                        break
                    budget[0] -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self._stop = True
        self.listener.close()


def random_file(path, size: int, seed: int = 0):
    import random
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def wait_until(what: str, fn, timeout: float = 60, every: float = 0.25, explain=None):
    """Poll ``fn`` until it returns something true (returned); fail naming ``what`` and,
    when given, what ``explain()`` says of the state things were left in."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= deadline:
            detail = ""
            if explain is not None:
                try:
                    detail = f"\n{explain()}"
                except Exception as e:  # noqa: BLE001 — the failure itself is what matters
                    detail = f"\n(could not explain: {e})"
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(every)


def recent_events(host, vm: str, n: int = 12) -> str:
    """The VM's last events on ``host``, one per line (for failure messages)."""
    return "\n".join(f"  {host.name}: {e['kind']}: {e['message']}"
                      for e in host.json("events", vm)[-n:])


def replica_row(home, vm: str) -> dict:
    """A VM's relationship row as the home's state store holds it (read only)."""
    import json
    import sqlite3
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT state, data FROM relationships WHERE vm=?", (vm,)).fetchone()
        return {"state": row[0], **json.loads(row[1])}
    finally:
        db.close()


def seeded(a, b, vm: str, size: str = "256M"):
    """A powered-off VM on ``a`` replicated to ``b``, its initial copy done; its disk."""
    a.run("vm", "create", vm, "--disk", size)
    disk = a.vm(vm)["disks"][0]["path"]
    a.run("enable", vm, "--replica", b.address)
    a.run("initial", vm)
    return disk


def fails(host, *args, code=None, says=()):
    """Run a command that must fail: a non-zero exit (``code`` if given), one `error:`
    line first, no traceback, each of ``says`` in its output. Returns stderr."""
    proc = host.run(*args, check=False)
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for text in says:
        assert text in proc.stderr, proc.stderr
    return proc.stderr
