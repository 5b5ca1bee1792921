"""Two (or more) hosts on one machine, driven through the real CLI: what the demo, the
end-to-end tests and the benchmarks build on. Each host is its own home, daemon and port.

Nothing here is a fake: every call runs `vmreplica ...` as an operator would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


class CommandFailed(Exception):
    def __init__(self, args, proc):
        self.args_, self.proc = args, proc
        super().__init__(f"vmreplica {' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stdout}{proc.stderr}")


def free_port() -> int:
    """A free port whose next one is free too: a host listens on both (replication on
    PORT, its web port on PORT + 1), and `init` refuses a port pair in use."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise OSError("no free pair of ports on 127.0.0.1")


def cli_path() -> list[str]:
    exe = Path(sys.executable).with_name("vmreplica")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vmreplica.cli.main"]


class LabHost:
    def __init__(self, home: Path, name: str, port: int | None = None, accel: str = "tcg",
                 driver: str = "qemu"):
        self.home = Path(home)
        self.name = name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.accel = accel
        self.driver = driver

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
        cmd = cli_path() + ["--home", str(self.home), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise CommandFailed(list(args), proc)
        return proc

    def json(self, *args: str, timeout: float = 600):
        return json.loads(self.run(*args, "--json", timeout=timeout).stdout)

    def init(self) -> LabHost:
        self.run("init", "--name", self.name, "--listen", self.address, "--accel", self.accel,
                 "--driver", self.driver)
        return self

    def start(self) -> LabHost:
        self.run("serve", "--detach")
        return self

    def stop(self) -> None:
        self.run("shutdown", check=False)

    def daemon_pid(self) -> int | None:
        try:
            return int((self.home / "run" / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def vm(self, name: str) -> dict:
        return self.json("vm", "show", name)


def pair(primary: LabHost, replica: LabHost) -> None:
    token = replica.run("trust", "token").stdout.strip().splitlines()[-1]
    primary.run("trust", "pair", replica.address, token)


def two_sites(root: Path, accel: str = "tcg", driver: str = "qemu",
              names: tuple[str, str] = ("site-a", "site-b")) -> tuple[LabHost, LabHost]:
    """A primary and a replica host, initialised, running, paired both ways, each a
    replica server that allows the other."""
    root = Path(root)
    a = LabHost(root / "a", names[0], accel=accel, driver=driver).init().start()
    b = LabHost(root / "b", names[1], accel=accel, driver=driver).init().start()
    pair(a, b)
    pair(b, a)
    b.run("replica-server", "enable", "--allow", a.name)
    a.run("replica-server", "enable", "--allow", b.name)
    return a, b


def teardown(*hosts: LabHost, remove: bool = False) -> None:
    """Stop every VM and daemon of the hosts (best effort), optionally delete their homes."""
    for h in hosts:
        try:
            vms = h.json("vm", "list", timeout=30)
        except Exception:  # noqa: BLE001 — the daemon may be down already
            vms = []
        for v in vms:
            if v.get("state") == "running":
                h.run("vm", "stop", v["name"], "--force", check=False, timeout=60)
        h.stop()
        _kill_leftovers(h.home)
    for h in hosts:
        if h.driver == "libvirt":
            _undefine_domains(h.home)
    if remove:
        for h in hosts:
            shutil.rmtree(h.home, ignore_errors=True)


def _undefine_domains(home: Path) -> None:
    """libvirt keeps domains after their host's daemon is gone: remove this home's."""
    try:
        import libvirt
    except ImportError:
        return
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        return
    try:
        for dom in conn.listAllDomains():
            try:
                if str(home) not in dom.XMLDesc(0):
                    continue
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
                                  | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM", 0))
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()


def _kill_leftovers(home: Path) -> None:
    """QEMU processes of a home whose daemon is gone (a test that killed it, say)."""
    run = home / "run"
    if not run.exists():
        return
    for pidfile in run.glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        # Only a QEMU of this home (its pid file named on its command line): a stale pid
        # file's pid may belong to another process by now.
        if b"qemu" in cmd and str(pidfile).encode() in cmd:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    time.sleep(0.05)
