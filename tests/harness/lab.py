"""Two (or more) hosts on one machine, driven through the real CLI: what the demo, the
end-to-end tests and the benchmarks build on. Each host is its own home, daemon and port.

Nothing here is a fake: every call runs `vmreplica ...` as an operator would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
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
            # (an existing libvirt domain listed beside ours is not this lab's to stop)
            if v.get("state") == "running" and v.get("origin", "vmreplica") == "vmreplica":
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
    _undefine_where(lambda xml, vm: str(home) in xml)


# -- lab roots and the domains a killed run leaves ------------------------------------------
# A run killed hard (SIGKILL, a session's end) never reaches teardown: its libvirt domains
# stay defined in /etc/libvirt/qemu, and the next run's hosts (same names, same VM names)
# would find them. Every lab root records the process that owns it; a run sweeps away
# the domains of roots whose owner is gone before it builds hosts of its own.
OWNER_FILE = ".vmr-lab-owner"
# a pytest lab root made before roots recorded their owner (tempfile.mkdtemp's 8 characters)
_LEGACY_ROOT = re.compile(r"^vmr(lv)?-[A-Za-z0-9_]{8}$")


def process_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim_root(root: Path) -> None:
    """Record this process as the owner of a lab root under /tmp (see sweep_stale_domains)."""
    (Path(root) / OWNER_FILE).write_text(f"{os.getpid()} {process_start_time(os.getpid())}\n")


def root_is_stale(root: Path) -> bool:
    """A lab root whose domains nobody will tear down: gone, owned by a process that is
    no longer running (pid and start time, so a reused pid does not count), or a pytest
    root from before owners were recorded."""
    if not root.is_dir():
        return True
    try:
        pid, started = (root / OWNER_FILE).read_text().split()
    except FileNotFoundError:
        return bool(_LEGACY_ROOT.match(root.name))
    except (OSError, ValueError):
        return False
    return process_start_time(int(pid)) != started


def sweep_stale_domains() -> list[str]:
    """Destroy and undefine the vmreplica domains whose home lies in a stale lab root under
    /tmp (never a domain without vmreplica metadata, nor one of a home elsewhere).
    Returns the domain names removed."""
    def stale(xml: str, vm) -> bool:
        if vm is None or not vm.home:
            return False
        path = Path(vm.home)
        if Path("/tmp") not in path.parents:
            return False
        return root_is_stale(Path("/tmp") / path.relative_to("/tmp").parts[0])
    return _undefine_where(stale)


def _undefine_where(match) -> list[str]:
    """Destroy and undefine the domains for which match(xml, vmreplica metadata or None)."""
    try:
        import libvirt

        from vmreplica.hypervisor.libvirt.domainxml import parse
    except ImportError:
        return []
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        return []
    removed = []
    try:
        for dom in conn.listAllDomains():
            try:
                xml = dom.XMLDesc(0)
                try:
                    vm = parse(xml)[1]
                except (ET.ParseError, AssertionError, ValueError):   # not one vmreplica wrote
                    vm = None
                if not match(xml, vm):
                    continue
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
                                  | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM", 0))
                removed.append(dom.name())
            except libvirt.libvirtError:
                continue
    finally:
        conn.close()
    return removed


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
