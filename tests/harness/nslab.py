"""A real Pacemaker/Corosync cluster on one machine: two nodes and a corosync-qnetd witness,
each in its own namespaces, with a PDU that fences for real. For tests and `make demo-ha`.

Layout (everything under `root`, which the lab owns and removes at stop()):

    root/init.py                 PID 1 of every node (a small Python init, see _INIT)
    root/pdu.sock                the lab PDU (unix socket; /tmp is shared with the nodes)
    root/certs/                  the qdevice/qnetd certificate exchange
    root/nodes/NODE/             per node: etc-corosync, var-lib-corosync, var-lib-pacemaker,
                                 var-log-corosync, var-log-pacemaker, run, console.log, boot.json;
                                 with libvirtd=True also etc-libvirt, var-lib-libvirt and
                                 var-log-libvirt (the node's own libvirtd; see LIBVIRT_CAPS)
    root/witness/                the witness: etc-corosync (qnetd nssdb), run, console.log

A node is a network namespace (`ip netns add`) plus, inside it, mount, UTS, IPC and PID
namespaces made by `unshare`, whose PID 1 is the init above: it bind-mounts the node's
private directories over /etc/corosync, /var/lib/corosync, /var/lib/pacemaker,
/var/log/corosync, /var/log/pacemaker and /run, mounts its own /dev/shm, sets the hostname,
then starts corosync, corosync-qdevice (virtlogd and libvirtd with libvirtd=True) and
pacemakerd. Killing that init is the node's power switch: the kernel kills every process
of the PID namespace with it (daemons, resource agents, and VMs started inside the node,
by the vmreplica daemon or by the node's libvirtd). /tmp and the rest of the root
filesystem stay shared with the host.

Networks: a veth pair hb0 <-> hb0 between the two nodes carries the heartbeat (knet,
10.77.0.N/24); each node also has wn0 on a bridge br0 in the witness's namespace
(10.78.0.N/24, witness 10.78.0.254), whose ports are `isolated` so the nodes cannot reach
each other through it. cut_link()/heal_link() take only the heartbeat veth down/up.

Safety: processes are started from one long-lived thread with PDEATHSIG, so if the Python
process that owns the lab dies, every node dies with it; the network namespaces of a dead
owner are removed by the next lab's start() (cleanup_stale()). Pacemaker's panic path
writes to /proc/sysrq-trigger (which would reboot the whole machine): each node gets
/dev/null bind-mounted there.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from vmreplica.cluster import pacemaker

from . import fence_vmreplica

HEARTBEAT_NET = "10.77.0"
WITNESS_NET = "10.78.0"
WITNESS_HOST = 254
NETNS_PREFIX = "vmrlab-"
BOOT_MARK = "vmr-lab-booted"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STACK_PREFIXES = ("corosync", "pacemaker")  # comm names of the cluster stack's processes

_seq = iter(range(1_000_000))


class LabError(RuntimeError):
    pass


# --------------------------------------------------------------------------- status


@dataclass
class NodeStatus:
    name: str
    online: bool
    standby: bool
    unclean: bool
    pending: bool
    is_dc: bool
    resources_running: int


@dataclass
class ClusterStatus:
    """What one node's `crm_mon --output-as=xml` says."""
    seen_from: str
    dc: str | None
    quorate: bool
    nodes: dict[str, NodeStatus]
    resources: dict[str, list[str]]       # resource id -> nodes it is active on
    roles: dict[str, str]                 # resource id -> role (Started, Stopped, ...)
    failed: list[str]                     # resource ids marked failed
    xml: ET.Element = field(repr=False)

    def online(self) -> list[str]:
        return sorted(n for n, s in self.nodes.items() if s.online)

    def running_on(self, resource: str) -> list[str]:
        return self.resources.get(resource, [])


def parse_crm_mon(text: str, seen_from: str = "") -> ClusterStatus:
    root = ET.fromstring(text)
    dc_el = root.find("./summary/current_dc")
    dc, quorate = None, False
    if dc_el is not None and dc_el.get("present") == "true":
        dc = dc_el.get("name")
        quorate = dc_el.get("with_quorum") == "true"
    nodes = {}
    for n in root.iterfind("./nodes/node"):      # (name and id: required by crm_mon's schema)
        nodes[n.get("name", "")] = NodeStatus(
            name=n.get("name", ""), online=n.get("online") == "true",
            standby=n.get("standby") == "true", unclean=n.get("unclean") == "true",
            pending=n.get("pending") == "true", is_dc=n.get("is_dc") == "true",
            resources_running=int(n.get("resources_running") or 0))
    resources: dict[str, list[str]] = {}
    roles: dict[str, str] = {}
    failed: list[str] = []
    for r in root.iter("resource"):
        rid = r.get("id", "")
        on = [n.get("name", "") for n in r.findall("node")]
        resources.setdefault(rid, [])
        if r.get("active") == "true":
            resources[rid].extend(x for x in on if x not in resources[rid])
        roles[rid] = r.get("role", "")
        if r.get("failed") == "true":
            failed.append(rid)
    return ClusterStatus(seen_from=seen_from, dc=dc, quorate=quorate, nodes=nodes,
                         resources=resources, roles=roles, failed=failed, xml=root)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes
    (LabError naming `what`). Exceptions from the predicate count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polled conditions may fail while converging
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc})" if last_exc else ""
            raise LabError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------- availability


REQUIRED_TOOLS = ("ip", "bridge", "unshare", "nsenter", "setpriv", "mount", "sysctl", "timeout",
                  "corosync", "corosync-cmapctl", "corosync-keygen", "pacemakerd", "crm_mon",
                  "cibadmin", "stonith_admin")
# libvirtd=True: each node runs its own libvirtd (and virtlogd), started before Pacemaker
# and stopped after it; the VMs it starts are processes of the node, so they die with it.
# libvirtd caches QEMU's capabilities keyed by, among others, the CPUID of the CPU it
# runs on; these machines' vCPUs differ (APIC ids), so an unpinned libvirtd finds the
# cache "outdated: host cpuid changed" at random and probes QEMU again (7 s idle, over
# 30 s on a loaded machine). Pinned to CPU 0 (its QEMUs get every CPU again: libvirt
# does not pass its own affinity on) and sharing one cache across nodes and labs, the
# probe happens once per machine.
LIBVIRT_TOOLS = ("libvirtd", "virtlogd", "virsh", "taskset")
LIBVIRT_CAPS = Path("/var/cache/vmreplica/nslab-libvirt")
LIBVIRT_SERVICES: list[dict[str, object]] = [
    {"name": "virtlogd", "argv": ["virtlogd"]},
    {"name": "libvirtd", "argv": ["taskset", "-c", "0", "libvirtd"],
     "ready": ["timeout", "10", "virsh", "-c", "qemu:///system", "version"],
     "ready_timeout": 110}]
WITNESS_TOOLS = ("corosync-qdevice", "corosync-qnetd", "corosync-qdevice-net-certutil",
                 "corosync-qnetd-certutil", "certutil")


def namespaces_available() -> tuple[bool, str]:
    """Can this machine make the lab's namespaces? (ok, reason when not). The only reason
    a test may skip: everything else is installed by the project's setup."""
    if os.geteuid() != 0:
        return False, "the cluster lab needs root (network, mount and PID namespaces)"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool, path=PATH):
            return False, f"{tool} is not installed"
    name = f"{NETNS_PREFIX}{os.getpid()}-probe{next(_seq)}"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if p.returncode != 0:
        return False, f"`ip netns add` does not work here: {p.stderr.strip()}"
    try:
        p = subprocess.run(["ip", "netns", "exec", name, "unshare", "--mount", "--uts", "--ipc",
                            "--pid", "--fork", "--mount-proc", "--propagation", "private",
                            "true"], capture_output=True, text=True, timeout=20)
        if p.returncode != 0:
            return False, f"unshare of mount/UTS/IPC/PID namespaces fails: {p.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


def missing_tools(witness: bool = True) -> list[str]:
    """Commands the lab needs that are not installed (scripts/cluster-packages.txt)."""
    tools = REQUIRED_TOOLS + (WITNESS_TOOLS if witness else ())
    return [t for t in tools if not shutil.which(t, path=PATH)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove the network namespaces (and their processes) of labs whose owning process
    is gone (a test run killed hard). Returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return removed
    for name in names:
        m = re.match(rf"{NETNS_PREFIX}(\d+)-", name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        p = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in p.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    return removed


# --------------------------------------------------------------------------- /proc helpers


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) == pid:
            out.append(int(entry))
    return out


def _pidns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _cpu_and_comm(pid: int) -> tuple[str, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    fields = data.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])          # utime + stime
    return comm, ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the node init

_INIT = r'''
"""PID 1 of a vmreplica lab node: private mounts, hostname, then the services; reaps
orphans; SIGTERM = clean shutdown (services stopped in reverse order), SIGKILL from the
host = power off."""
import json, os, signal, socket, subprocess, sys, time

cfg = json.load(open(sys.argv[1]))
console = open(cfg["console"], "a", buffering=1)
env = dict(cfg["env"])


def log(msg):
    console.write(f"{time.strftime('%H:%M:%S')} [{cfg['hostname']} init] {msg}\n")


def sh(*argv):
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=console, stderr=console)


try:
    for src, dst in cfg["binds"]:
        sh("mount", "--bind", src, dst)
    sh("mount", "-t", "tmpfs", "-o", "mode=1777,size=512m", "vmrlab-shm", "/dev/shm")
    if os.path.exists("/proc/sysrq-trigger"):
        sh("mount", "--bind", "/dev/null", "/proc/sysrq-trigger")
    socket.sethostname(cfg["hostname"])
    sh("ip", "link", "set", "lo", "up")
    for d in cfg["mkdirs"]:
        os.makedirs(d, exist_ok=True)
except Exception as e:
    log(f"boot failed: {e}")
    sys.exit(1)

started = []
stopping = False


def shutdown(signum, frame):
    global stopping
    if stopping:
        return
    stopping = True
    log("shutdown requested")
    for name, proc in reversed(started):
        if proc.poll() is None:
            log(f"stopping {name}")
            proc.terminate()
            try:
                proc.wait(timeout=cfg.get("stop_timeout", 60))
            except subprocess.TimeoutExpired:
                proc.kill()
    log("halted")
    sys.exit(0)


signal.signal(signal.SIGTERM, shutdown)

for svc in cfg["services"]:
    log(f"starting {svc['name']}")
    proc = subprocess.Popen(svc["argv"], stdin=subprocess.DEVNULL, stdout=console,
                            stderr=console, env=env)
    started.append((svc["name"], proc))
    if svc.get("ready"):
        deadline = time.monotonic() + svc.get("ready_timeout", 20)
        while True:
            if proc.poll() is not None:
                log(f"{svc['name']} exited with {proc.returncode} before it was ready")
                break
            if subprocess.run(svc["ready"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env).returncode == 0:
                break
            if time.monotonic() > deadline:
                log(f"{svc['name']} not ready after {svc.get('ready_timeout', 20)} s")
                break
            time.sleep(0.1)

with open(f"/run/{cfg['boot_mark']}", "w") as f:
    f.write(f"{time.time()}\n")
log("booted")
names = {proc.pid: name for name, proc in started}
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        time.sleep(1)
        continue
    except InterruptedError:
        continue
    if pid in names:
        log(f"{names[pid]} exited (status {status})")
'''


# --------------------------------------------------------------------------- machines


class _Machine:
    """A node or the witness: a network namespace and, when powered on, an init."""

    def __init__(self, name: str, netns: str, home: Path):
        self.name = name
        self.netns = netns
        self.home = home
        self.proc: subprocess.Popen | None = None    # the host-side unshare process
        self.init_pid: int | None = None             # host pid of the node's PID 1
        self.pidns: str | None = None
        self.booted_at: float | None = None          # monotonic time of the last power-on

    def is_on(self) -> bool:
        return (self.init_pid is not None and _pidns(self.init_pid) == self.pidns
                and _ppid(self.init_pid) == (self.proc.pid if self.proc else None))

    def processes(self) -> list[int]:
        if not self.pidns:
            return []
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _pidns(int(entry)) == self.pidns:
                out.append(int(entry))
        return out


# --------------------------------------------------------------------------- the lab


class ClusterLab:
    """Two cluster nodes and (optionally) a qnetd witness in namespaces; see the module
    docstring. Use as a context manager, or start() ... stop() in a finally."""

    def __init__(self, root: Path | str, cluster_name: str = "vmr",
                 nodes: tuple[str, ...] = ("node1", "node2"), witness: bool = True, *,
                 fence_action: str = "off", token_ms: int = 1000, keep_root: bool = False,
                 libvirtd: bool = False):
        if len(nodes) != 2 or len(set(nodes)) != 2:
            raise ValueError("the lab builds exactly two distinct nodes")
        for n in nodes:
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,14}", n):
                raise ValueError(f"invalid node name {n!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", cluster_name):
            raise ValueError(f"invalid cluster name {cluster_name!r}")
        if fence_action not in ("off", "reboot"):
            raise ValueError("fence_action is 'off' or 'reboot'")
        self.root = Path(root).absolute()
        self.cluster_name = cluster_name
        self.nodes = tuple(nodes)
        self.witness = witness
        self.fence_action = fence_action
        self.token_ms = token_ms
        self.libvirtd = libvirtd
        # A node's libvirtd may have to probe QEMU's capabilities first (LIBVIRT_CAPS).
        self.boot_timeout = 120.0 if libvirtd else 30.0
        self.keep_root = keep_root or os.environ.get("VMREPLICA_KEEP_LAB") == "1"
        self.pdu_socket = self.root / "pdu.sock"
        if len(os.fsencode(self.pdu_socket)) > 100:
            raise ValueError(f"root {self.root} is too long for a unix socket path")
        self.pdu_log: list[tuple[float, str, str, str]] = []   # (time, command, node, result)
        tag = f"{NETNS_PREFIX}{os.getpid()}-{next(_seq)}"
        self._machines: dict[str, _Machine] = {
            n: _Machine(n, f"{tag}-{n}", self.root / "nodes" / n) for n in self.nodes}
        self._witness = _Machine("witness", f"{tag}-witness", self.root / "witness") \
            if witness else None
        self._netns_made: list[str] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._power_thread: threading.Thread | None = None
        self._pdu_sock: socket.socket | None = None
        self._pdu_thread: threading.Thread | None = None
        self._pdu_stop = threading.Event()
        self._started = False
        self._root_made = False
        self.boot_started: float | None = None

    # ----------------------------------------------------------------- life cycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Self:
        ok, why = namespaces_available()
        if not ok:
            raise LabError(why)
        missing = missing_tools(self.witness) + \
            [t for t in LIBVIRT_TOOLS if self.libvirtd and not shutil.which(t, path=PATH)]
        if missing:
            raise LabError(f"not installed: {', '.join(missing)} (see scripts/cluster-packages.txt)")
        if self.root.exists() and any(self.root.iterdir()):
            raise LabError(f"{self.root} is not empty (the lab owns its root)")
        cleanup_stale()
        self._started = True
        try:
            self._root_made = True
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o755)
            fence_vmreplica.install_fence_agent()
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"vmrlab-power-{self.cluster_name}")
            self._write_tree()
            self._make_networks()
            self._start_pdu()
            self.boot_started = time.monotonic()
            if self._witness:
                self._power(self._boot, self._witness)
            for n in self.nodes:
                self._power(self._boot, self._machines[n], False)
            for n in self.nodes:
                self._wait_booted(self._machines[n], self.boot_timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Tear everything down: nodes, witness, PDU, namespaces (and their veths and
        bridge), root. Idempotent; never raises for what is already gone."""
        if not self._started:
            return
        errors = []
        # The PDU first (no power command may start while tearing down), then the power
        # thread (its end also kills every node through PDEATHSIG), then wait for each
        # node's processes to be gone.
        self._pdu_stop.set()
        if self._pdu_sock is not None:
            try:
                self._pdu_sock.close()
            except OSError:
                pass
            self._pdu_sock = None
        if self._pdu_thread is not None:
            self._pdu_thread.join(timeout=5)
            self._pdu_thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for m in [*self._machines.values(), *([self._witness] if self._witness else [])]:
            try:
                self._kill(m)
            except Exception as e:  # noqa: BLE001 - go on tearing down
                errors.append(f"{m.name}: {e}")
        for ns in reversed(self._netns_made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._netns_made.clear()
        if self._root_made and not self.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)
        self._started = False
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    # ----------------------------------------------------------------- facts

    def address(self, node: str) -> str:
        """The node's heartbeat (corosync ring0) address."""
        return f"{HEARTBEAT_NET}.{self._index(node)}"

    def witness_address(self, node: str | None = None) -> str | None:
        """The witness's address, or a node's address on the witness network."""
        if not self.witness:
            return None
        return f"{WITNESS_NET}.{WITNESS_HOST if node is None else self._index(node)}"

    def netns(self, node: str) -> str:
        return self._machine(node).netns

    def node_dir(self, node: str) -> Path:
        return self._machine(node).home

    def pid(self, node: str) -> int | None:
        """Host pid of the node's init (PID 1 inside), None when the node is off."""
        m = self._machine(node)
        return m.init_pid if m.is_on() else None

    def is_on(self, node: str) -> bool:
        return self._machine(node).is_on()

    def processes(self, node: str) -> list[int]:
        """Host pids of every process of the node (its PID namespace)."""
        return self._machine(node).processes()

    # ----------------------------------------------------------------- commands

    def _nsenter(self, node: str, argv: list[str]) -> list[str]:
        m = self._machine(node)
        if not m.is_on():
            raise LabError(f"{node} is powered off")
        return ["nsenter", "-t", str(m.init_pid), "-m", "-u", "-i", "-n", "-p", "--", *argv]

    def _env(self, env: dict | None) -> dict:
        e = dict(os.environ if env is None else env)
        e["PATH"] = PATH + (":" + e["PATH"] if e.get("PATH") else "")
        return e

    def run(self, node: str, argv: list[str], *, check: bool = False, timeout: float = 60,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the node (all its namespaces), capture text output. After
        `timeout` seconds the command is killed inside the node (`timeout -k 3`; exit
        status 124 or 137). LabError when the node is off."""
        inner = ["timeout", "-k", "3", f"{timeout:g}", *argv]
        return subprocess.run(self._nsenter(node, inner), capture_output=True, text=True,
                              input=input, env=self._env(env), timeout=timeout + 10,
                              check=check, stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, node: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv inside the node; the process dies when the node powers off."""
        kwargs["env"] = self._env(kwargs.get("env"))
        return subprocess.Popen(self._nsenter(node, argv), **kwargs)

    # ----------------------------------------------------------------- power

    def power_off(self, node: str) -> None:
        """Pull the plug: SIGKILL the node's init; returns once no process of the node is
        left. Does nothing to a node that is already off."""
        self._power(self._kill, self._machine(node))

    def power_on(self, node: str, wait: bool = True, timeout: float | None = None) -> None:
        """Boot the node (fresh /run and /dev/shm; corosync, qdevice, pacemakerd). With
        wait, returns once its init has started them (it rejoins the cluster after)."""
        m = self._machine(node)
        self._power(self._boot, m, False)
        if wait:
            self._wait_booted(m, timeout or self.boot_timeout)

    def shutdown(self, node: str, timeout: float = 90) -> None:
        """Clean shutdown: the init stops pacemakerd (resources move away), qdevice and
        corosync, then exits."""
        m = self._machine(node)
        if not m.is_on() or m.init_pid is None:     # (is_on: it has an init_pid)
            return
        os.kill(m.init_pid, signal.SIGTERM)
        wait_for(lambda: not m.is_on(), timeout, what=f"{node} to shut down")
        self._power(self._kill, m)

    def _power(self, fn, *args):
        """Run a power operation on the lab's one power thread (serialised; processes it
        starts carry PDEATHSIG for that long-lived thread)."""
        if self._executor is None:
            raise LabError("the lab is not started")
        if threading.current_thread() is self._power_thread:
            return fn(*args)
        return self._executor.submit(self._on_power_thread, fn, *args).result()

    def _on_power_thread(self, fn, *args):
        self._power_thread = threading.current_thread()
        return fn(*args)

    def _boot(self, m: _Machine, wait_booted: bool = True) -> None:
        if m.is_on():
            return
        self._kill(m)                      # reap a dead previous incarnation
        run = m.home / "run"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(mode=0o755)
        console = open(m.home / "console.log", "a")  # noqa: SIM115 — closed in the finally
        try:
            argv = ["setpriv", "--pdeathsig", "KILL", "--",
                    "ip", "netns", "exec", m.netns,
                    "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--mount-proc",
                    "--propagation", "private", "--kill-child=SIGKILL", "--",
                    "/usr/bin/python3", "-I", "-S", str(self.root / "init.py"),
                    str(m.home / "boot.json")]
            m.proc = proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                             stderr=console, start_new_session=True,
                                             env={"PATH": PATH, "LANG": "C.UTF-8"})
        finally:
            console.close()
        m.booted_at = time.monotonic()

        def init_pid():
            if proc.poll() is not None:
                raise LabError(f"{m.name} did not boot: {self._console_tail(m)}")
            kids = _children(proc.pid)
            return kids[0] if kids and _pidns(kids[0]) != _pidns(proc.pid) else None
        m.init_pid = wait_for(init_pid, 10, 0.02, what=f"{m.name}'s init")
        m.pidns = _pidns(m.init_pid)
        if wait_booted:
            self._wait_booted(m, self.boot_timeout)

    def _wait_booted(self, m: _Machine, timeout: float) -> None:
        mark = m.home / "run" / BOOT_MARK

        def booted():
            if not m.is_on():
                raise LabError(f"{m.name} died while booting: {self._console_tail(m)}")
            return mark.exists()
        try:
            wait_for(booted, timeout, 0.05, what=f"{m.name} to boot")
        except LabError as e:
            raise LabError(f"{e}\n{self._console_tail(m)}") from None

    def _kill(self, m: _Machine) -> None:
        if m.init_pid is not None and m.is_on():
            try:
                os.kill(m.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if m.proc is not None:
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(timeout=5)
        if m.pidns:
            wait_for(lambda: not m.processes(), 15, 0.02, what=f"{m.name}'s processes to die")
        m.proc = None
        m.init_pid = None
        m.pidns = None

    def _console_tail(self, m: _Machine, lines: int = 15) -> str:
        try:
            text = (m.home / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------- network

    def cut_link(self) -> None:
        """Take the heartbeat link down at both ends (the witness network stays up)."""
        for n in self.nodes:
            self._ip(n, "link", "set", "hb0", "down")

    def heal_link(self) -> None:
        for n in self.nodes:
            self._ip(n, "link", "set", "hb0", "up")

    def link_is_up(self) -> bool:
        out = subprocess.run(["ip", "-n", self.netns(self.nodes[0]), "-o", "link", "show", "hb0"],
                             capture_output=True, text=True).stdout
        return "state UP" in out or ",UP" in out.split(">")[0]

    def _ip(self, node: str, *args: str, ns: str | None = None) -> None:
        ns = ns or self._machine(node).netns
        p = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError(f"ip -n {ns} {' '.join(args)}: {p.stderr.strip()}")

    def _make_networks(self) -> None:
        machines = [*self._machines.values(), *([self._witness] if self._witness else [])]
        for m in machines:
            p = subprocess.run(["ip", "netns", "add", m.netns], capture_output=True, text=True)
            if p.returncode != 0:
                raise LabError(f"ip netns add {m.netns}: {p.stderr.strip()}")
            self._netns_made.append(m.netns)
            self._ip("", "link", "set", "lo", "up", ns=m.netns)
            for key in ("all", "default"):
                subprocess.run(["ip", "netns", "exec", m.netns, "sysctl", "-q", "-w",
                                f"net.ipv6.conf.{key}.disable_ipv6=1"], capture_output=True)
        a, b = (self._machines[n] for n in self.nodes)
        self._ip("", "link", "add", "hb0", "type", "veth", "peer", "name", "hb0", "netns", b.netns,
                 ns=a.netns)
        for n in self.nodes:
            self._ip(n, "addr", "add", f"{self.address(n)}/24", "dev", "hb0")
            self._ip(n, "link", "set", "hb0", "up")
        if self._witness:
            w = self._witness.netns
            self._ip("", "link", "add", "br0", "type", "bridge", ns=w)
            self._ip("", "addr", "add", f"{self.witness_address()}/24", "dev", "br0", ns=w)
            self._ip("", "link", "set", "br0", "up", ns=w)
            for n in self.nodes:
                port = f"p-{n}"[:15]
                self._ip(n, "link", "add", "wn0", "type", "veth", "peer", "name", port,
                         "netns", w)
                self._ip("", "link", "set", port, "master", "br0", ns=w)
                p = subprocess.run(["bridge", "-n", w, "link", "set", "dev", port,
                                    "isolated", "on"], capture_output=True, text=True)
                if p.returncode != 0:
                    raise LabError(f"bridge link set {port} isolated on: {p.stderr.strip()}")
                self._ip("", "link", "set", port, "up", ns=w)
                self._ip(n, "addr", "add", f"{self.witness_address(n)}/24", "dev", "wn0")
                self._ip(n, "link", "set", "wn0", "up")

    # ----------------------------------------------------------------- configuration

    def corosync_conf(self) -> str:
        """What `vmreplica cluster setup` writes, for the lab's addresses and token."""
        return pacemaker.corosync_conf(self.cluster_name,
                                       [(n, self.address(n)) for n in self.nodes],
                                       self.witness_address(), token=self.token_ms)

    def cib_xml(self) -> str:
        """The seed CIB `vmreplica cluster setup` writes, with one fence_vmreplica device
        per node (the lab's PDU), dc-deadtime=2s for fast formation."""
        return pacemaker.cib_bootstrap(
            self.cluster_name, list(self.nodes), "fence_vmreplica",
            {"pdu_socket": str(self.pdu_socket)},
            {"stonith-action": self.fence_action, "stonith-timeout": "40s",
             "dc-deadtime": "2s"}, two_node=not self.witness)

    def _write_tree(self) -> None:
        hacluster = _ids("hacluster", "haclient")
        (self.root / "init.py").write_text(_INIT.lstrip())
        certs = self.root / "certs"
        certs.mkdir()
        authkey = certs / "authkey"
        _check(["corosync-keygen", "-l", "-k", str(authkey)], "corosync-keygen")
        conf = self.corosync_conf()
        env = {"PATH": PATH, "LANG": "C.UTF-8"}
        pcmk_env = {**env, "PCMK_logfile": "/var/log/pacemaker/pacemaker.log",
                    "PCMK_logfacility": "none", "PCMK_debug": "no"}
        for m in self._machines.values():
            d = m.home
            for sub in ("etc-corosync", "var-lib-corosync", "var-log-corosync", "run"):
                (d / sub).mkdir(parents=True, mode=0o755)
            for sub in ("var-lib-pacemaker", "var-log-pacemaker"):
                (d / sub).mkdir(mode=0o770)
                os.chown(d / sub, *hacluster)
            for sub in ("cib", "pengine", "blackbox", "cores"):
                p = d / "var-lib-pacemaker" / sub
                p.mkdir(mode=0o750)
                os.chown(p, *hacluster)
            os.chmod(d / "var-lib-pacemaker", 0o750)
            (d / "etc-corosync" / "corosync.conf").write_text(conf)
            shutil.copyfile(authkey, d / "etc-corosync" / "authkey")
            os.chmod(d / "etc-corosync" / "authkey", 0o400)
            cib = d / "var-lib-pacemaker" / "cib" / "cib.xml"
            cib.write_text(self.cib_xml())
            os.chmod(cib, 0o600)
            os.chown(cib, *hacluster)
            services = [{"name": "corosync", "argv": ["corosync", "-f"],
                         "ready": ["corosync-cmapctl", "-g", "totem.cluster_name"],
                         "ready_timeout": 20}]
            if self.witness:
                services.append({"name": "corosync-qdevice", "argv": ["corosync-qdevice", "-f"]})
            binds = [[str(d / "etc-corosync"), "/etc/corosync"],
                     [str(d / "var-lib-corosync"), "/var/lib/corosync"],
                     [str(d / "var-lib-pacemaker"), "/var/lib/pacemaker"],
                     [str(d / "var-log-corosync"), "/var/log/corosync"],
                     [str(d / "var-log-pacemaker"), "/var/log/pacemaker"],
                     [str(d / "run"), "/run"]]
            mkdirs = ["/run/resource-agents", "/run/lock", "/run/crm"]
            if self.libvirtd:
                binds += self._libvirt_tree(d)
                mkdirs += ["/var/log/libvirt/qemu", "/run/libvirt"]
                services += LIBVIRT_SERVICES
            services.append({"name": "pacemakerd", "argv": ["pacemakerd"]})
            self._write_boot(m, binds, services, pcmk_env, mkdirs)
        if self._witness:
            d = self._witness.home
            (d / "etc-corosync" / "qnetd").mkdir(parents=True)
            (d / "run").mkdir()
            try:
                os.chown(d / "etc-corosync" / "qnetd", 0, _ids("root", "coroqnetd")[1])
            except KeyError:
                pass
            self._write_boot(self._witness,
                             [[str(d / "etc-corosync"), "/etc/corosync"], [str(d / "run"), "/run"]],
                             [{"name": "corosync-qnetd", "argv": ["corosync-qnetd", "-f"]}],
                             env, ["/run/corosync-qnetd"])
            self._certificates(certs, self._witness)

    @staticmethod
    def _libvirt_tree(d: Path) -> list[list[str]]:
        """A node's own libvirt (libvirtd=True): its configuration (the host's, without
        its domains, networks that autostart or the host's checkpoint and snapshot
        metadata), state and logs; the capabilities cache is shared (LIBVIRT_CAPS, first
        filled from the host's); /run is the node's already. Returns the binds."""
        etc = d / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, symlinks=True,
                        ignore=lambda src, names: [
                            n for n in names
                            if (Path(src).name == "qemu" and n.endswith(".xml"))
                            or n in ("autostart", "checkpoint", "snapshot")])
        if not LIBVIRT_CAPS.is_dir():
            tmp = LIBVIRT_CAPS.with_name(f"{LIBVIRT_CAPS.name}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            if Path("/var/cache/libvirt").is_dir():
                shutil.copytree("/var/cache/libvirt", tmp, symlinks=True)
            tmp.mkdir(parents=True, exist_ok=True)
            try:
                tmp.rename(LIBVIRT_CAPS)
            except OSError:                   # another lab made it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("var-lib-libvirt", "var-log-libvirt"):
            (d / sub).mkdir(mode=0o755)
        return [[str(etc), "/etc/libvirt"], [str(d / "var-lib-libvirt"), "/var/lib/libvirt"],
                [str(LIBVIRT_CAPS), "/var/cache/libvirt"],
                [str(d / "var-log-libvirt"), "/var/log/libvirt"]]

    def _write_boot(self, m: _Machine, binds, services, env, mkdirs) -> None:
        cfg = {"hostname": m.name, "console": str(m.home / "console.log"), "binds": binds,
               "services": services, "env": env, "mkdirs": mkdirs, "boot_mark": BOOT_MARK}
        (m.home / "boot.json").write_text(json.dumps(cfg, indent=1))

    def _certificates(self, certs: Path, witness: _Machine) -> None:
        """The offline qdevice/qnetd certificate exchange, each step with the machine's own
        /etc/corosync bind-mounted in a private mount namespace."""
        w = witness.home / "etc-corosync"
        first, second = (self._machines[n].home / "etc-corosync" for n in self.nodes)
        name = self.cluster_name
        qnetd_db = w / "qnetd" / "nssdb"
        node_db = Path("qdevice") / "net" / "nssdb"
        _with_etc(w, ["corosync-qnetd-certutil", "-i"])
        shutil.copy(qnetd_db / "qnetd-cacert.crt", certs)
        _with_etc(first, ["corosync-qdevice-net-certutil", "-i", "-c",
                          str(certs / "qnetd-cacert.crt")])
        _with_etc(first, ["corosync-qdevice-net-certutil", "-r", "-n", name])
        shutil.copy(first / node_db / "qdevice-net-node.crq", certs)
        _with_etc(w, ["corosync-qnetd-certutil", "-s", "-c",
                      str(certs / "qdevice-net-node.crq"), "-n", name])
        shutil.copy(qnetd_db / f"cluster-{name}.crt", certs)
        _with_etc(first, ["corosync-qdevice-net-certutil", "-M", "-c",
                          str(certs / f"cluster-{name}.crt")])
        shutil.copy(first / node_db / "qdevice-net-node.p12", certs)
        _with_etc(second, ["corosync-qdevice-net-certutil", "-i", "-c",
                           str(certs / "qnetd-cacert.crt")])
        _with_etc(second, ["corosync-qdevice-net-certutil", "-m", "-c",
                           str(certs / "qdevice-net-node.p12")])

    # ----------------------------------------------------------------- cluster state

    def crm_mon_xml(self, node: str, timeout: float = 15) -> ClusterStatus:
        """The cluster as `node` sees it (crm_mon --output-as=xml, parsed). LabError when
        crm_mon cannot answer (node off, Pacemaker not up yet)."""
        p = self.run(node, ["crm_mon", "--one-shot", "--inactive", "--output-as=xml"],
                     timeout=timeout)
        if p.returncode != 0 or "<pacemaker-result" not in p.stdout:
            raise LabError(f"crm_mon on {node} exited {p.returncode}: {p.stderr.strip()[-300:]}")
        return parse_crm_mon(p.stdout, node)

    def status(self, node: str) -> ClusterStatus | None:
        """crm_mon_xml(node), or None when the node is off or Pacemaker cannot answer."""
        try:
            return self.crm_mon_xml(node)
        except (LabError, subprocess.TimeoutExpired, ET.ParseError):
            return None

    def formed(self, fencing_ready: bool = True) -> bool:
        """Every node on, online and quorate in every node's view, one DC agreed, and
        (fencing_ready) every fence device started."""
        dcs = set()
        for n in self.nodes:
            s = self.status(n)
            if s is None or not s.quorate or s.dc is None or s.online() != sorted(self.nodes):
                return False
            if any(st.pending or st.unclean for st in s.nodes.values()):
                return False
            if fencing_ready and any(not s.running_on(f"fence-{x}") for x in self.nodes):
                return False
            dcs.add(s.dc)
        return len(dcs) == 1

    def wait_formed(self, timeout: float = 60, fencing_ready: bool = True) -> float:
        """Wait until formed(); returns the seconds since the nodes' last power-on."""
        wait_for(lambda: self.formed(fencing_ready), timeout, 0.25, what="the cluster to form")
        since = max(m.booted_at or 0 for m in self._machines.values())
        return time.monotonic() - since

    def fence_history(self, node: str, target: str = "*") -> list[dict[str, str]]:
        """Fencing actions as `node`'s fencer knows them (`stonith_admin --history TARGET
        --verbose`), oldest first: dicts with action, target, status ("success", ...),
        delegate, origin, completed ("YYYY-MM-DD HH:MM:SSZ", absent while pending).
        Without --verbose, stonith_admin shows one event per target (not the newest)."""
        p = self.run(node, ["stonith_admin", "--history", target, "--verbose",
                            "--output-as=xml"])
        if "<pacemaker-result" not in p.stdout:
            raise LabError(f"stonith_admin --history on {node}: {p.stderr.strip()}")
        root = ET.fromstring(p.stdout)
        events = [dict(e.attrib) for e in root.iter("fence_event")]
        return sorted(events, key=lambda e: e.get("completed", "9999"))

    def stack_cpu_seconds(self) -> dict[str, float]:
        """CPU time (user+system, seconds) used so far by the cluster stack's processes of
        every powered-on node and the witness (corosync*, pacemaker*), by process name."""
        out: dict[str, float] = {}
        for m in [*self._machines.values(), *([self._witness] if self._witness else [])]:
            for pid in m.processes():
                info = _cpu_and_comm(pid)
                if info and info[0].startswith(STACK_PREFIXES):
                    out[info[0]] = out.get(info[0], 0.0) + info[1]
        return out

    # ----------------------------------------------------------------- PDU

    def _start_pdu(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.pdu_socket))
        os.chmod(self.pdu_socket, 0o600)
        s.listen(16)
        s.settimeout(0.5)
        self._pdu_sock = s
        self._pdu_stop.clear()
        self._pdu_thread = threading.Thread(target=self._pdu_loop, args=(s,), name="vmrlab-pdu",
                                            daemon=True)
        self._pdu_thread.start()

    def _pdu_loop(self, sock: socket.socket) -> None:
        # The socket is passed, not read from self: stop() closes it (accept then raises
        # OSError) and sets the attribute to None, which the loop could otherwise read.
        while not self._pdu_stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pdu_serve, args=(conn,), daemon=True,
                             name="vmrlab-pdu-conn").start()

    def _pdu_serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                peer_pid = struct.unpack("3i", creds)[0]
                data = b""
                while not data.endswith(b"\n") and len(data) < 1024:
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                conn.settimeout(None)
                answer = self._pdu_command(data.decode(errors="replace").strip(), peer_pid)
                conn.sendall(answer.encode() + b"\n")
            except OSError:
                pass

    def _pdu_command(self, line: str, peer_pid: int) -> str:
        words = line.split()
        cmd, node = (words + ["", ""])[:2]
        if cmd == "list" and len(words) == 1:
            result = "ok " + " ".join(self.nodes)
        elif cmd in ("on", "off", "status") and len(words) == 2 and node in self._machines:
            if cmd == "status":
                result = "ok on" if self.is_on(node) else "ok off"
            else:
                try:
                    self._power(self._pdu_power, cmd, node, peer_pid)
                    result = f"ok {cmd}"
                except Exception as e:  # noqa: BLE001 - answered to the agent
                    result = f"error {cmd} {node}: {e}".replace("\n", " ")[:500]
        else:
            result = f"error unknown command {line[:100]!r} (on|off|status NODE, list)"
        if cmd in ("on", "off"):
            self.pdu_log.append((time.time(), cmd, node, result))
        return result

    def _pdu_power(self, cmd: str, node: str, peer_pid: int) -> None:
        # A request from a node that has died since it asked (a fence race) is not carried
        # out: its sender is gone, as the real one would be.
        if peer_pid and not _pid_alive(peer_pid):
            raise LabError("the requesting process is gone")
        m = self._machines[node]
        if cmd == "off":
            self._kill(m)
        else:
            self._boot(m, True)

    # ----------------------------------------------------------------- helpers

    def _machine(self, node: str) -> _Machine:
        if node == "witness" and self._witness:
            return self._witness
        try:
            return self._machines[node]
        except KeyError:
            raise LabError(f"no node {node!r} (nodes: {', '.join(self.nodes)})") from None

    def _index(self, node: str) -> int:
        if node not in self._machines:
            raise LabError(f"no node {node!r} (nodes: {', '.join(self.nodes)})")
        return self.nodes.index(node) + 1


def _ids(user: str, group: str) -> tuple[int, int]:
    import grp
    import pwd
    return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid


def _check(argv: list[str], what: str, timeout: float = 60) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       env={"PATH": PATH, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise LabError(f"{what} exited {p.returncode}: {(p.stdout + p.stderr).strip()[-800:]}")
    return p.stdout


def _with_etc(etc_dir: Path, argv: list[str]) -> str:
    """Run argv with etc_dir mounted over /etc/corosync in a private mount namespace."""
    script = 'mount --bind "$0" /etc/corosync && exec "$@"'
    return _check(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                   str(etc_dir), *argv], " ".join(argv))


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.nslab ROOT` (from tests/): build a lab, print how to reach it, keep it
    until Ctrl-C / SIGTERM (or --hold seconds), then tear it down."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m harness.nslab", description=main.__doc__)
    ap.add_argument("root", type=Path, help="a new directory under /tmp (removed at the end)")
    ap.add_argument("--no-witness", action="store_true", help="two_node quorum, no qnetd")
    ap.add_argument("--fence-action", choices=("off", "reboot"), default="off")
    ap.add_argument("--hold", type=float, default=None, help="seconds to keep the lab")
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ClusterLab(args.root, witness=not args.no_witness, fence_action=args.fence_action) as lab:
        print(f"formed in {lab.wait_formed(60):.1f} s", flush=True)
        for n in lab.nodes:
            print(f"{n}: heartbeat {lab.address(n)}, init pid {lab.pid(n)}; "
                  f"nsenter -t {lab.pid(n)} -m -u -i -n -p -- crm_mon -1", flush=True)
        print(f"PDU: {lab.pdu_socket}; fence_vmreplica -o status -n NODE --pdu-socket "
              f"{lab.pdu_socket}", flush=True)
        try:
            stop.wait(args.hold)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
