"""A protected VM on the namespace cluster lab: a vmreplica daemon on each of the lab's two
nodes, paired, the demo guest created on the first (or, ``existing``, an operator's
libvirt domain defined there with virsh) and protected by the cluster (continuous
replication to the other node plus its Pacemaker resource). The nodes' hosts
use the qemu driver, or the libvirt driver on a lab whose nodes run their own libvirtd.
Shared by the HA end-to-end tests and `make demo-ha`; every step is the real CLI run
inside a node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmreplica.errors import UsageError
from vmreplica.hypervisor.guest import read_demo_records

from .lab import cli_path
from .nslab import ClusterLab, LabError, wait_for
from .operator import demo_domain_xml

PORT = 7700
NETWORK, MAC = "vmrlan", "52:54:00:5e:19:01"     # an existing domain's NIC (define_existing)


class HASite:
    def __init__(self, lab: ClusterLab, homes_root: Path, vm: str = "ha-vm",
                 echo: Callable[[str], None] | None = None, driver: str = "qemu",
                 existing: bool = False):
        if driver == "libvirt" and not lab.libvirtd:
            raise LabError("the libvirt driver needs a lab whose nodes run libvirtd "
                           "(ClusterLab(..., libvirtd=True))")
        if existing and driver != "libvirt":
            raise LabError("an existing domain is a libvirt domain: use driver='libvirt'")
        self.lab = lab
        self.driver = driver
        self.vm = vm
        # An operator's domain, defined with virsh on the first node (not `vm create`):
        # its QEMU names the domain as the operator did; the replica VM is vmr-NODE-VM.
        self.existing = existing
        self.images = Path(homes_root).parent / f"images-{vm}"
        self.rsc = f"vm-{vm}"
        self.homes = {n: Path(homes_root) / n for n in lab.nodes}
        self.cli = cli_path()
        self.echo = echo

    # -- commands --------------------------------------------------------------------------

    def vmr(self, node: str, *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """`vmreplica --home HOME ARGS` inside `node`."""
        if self.echo:
            self.echo(f"[{node}]$ vmreplica {' '.join(args)}")
        p = self.lab.run(node, self.cli + ["--home", str(self.homes[node]), *args],
                         timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"[{node}] vmreplica {' '.join(args)} exited {p.returncode}: "
                               f"{p.stdout}{p.stderr}")
        if self.echo and p.stdout.strip():
            self.echo("  " + p.stdout.rstrip().replace("\n", "\n  "))
        return p

    def json(self, node: str, *args: str):
        echo, self.echo = self.echo, None
        try:
            return json.loads(self.vmr(node, *args, "--json").stdout)
        finally:
            self.echo = echo

    def addr(self, node: str) -> str:
        return f"{self.lab.address(node)}:{PORT}"

    def other(self, node: str) -> str:
        return next(n for n in self.lab.nodes if n != node)

    # -- what the cluster and the guest say ------------------------------------------------

    def running_on(self, node: str | None = None) -> list[str]:
        """Where Pacemaker runs the VM's resource, as `node` (or the first node that is on
        and answers) sees it."""
        for n in ([node] if node else self.lab.nodes):
            if self.lab.is_on(n):
                st = self.lab.status(n)
                if st is not None:
                    return st.running_on(self.rsc)
        return []

    def started_on(self, node: str) -> bool:
        """Pacemaker (as `node` sees it) runs the VM's resource on `node` alone and its
        start has finished: role Started, not Starting."""
        st = self.lab.status(node) if self.lab.is_on(node) else None
        return st is not None and st.running_on(self.rsc) == [node] and \
            st.roles.get(self.rsc) == "Started"

    def states(self, node: str) -> dict:
        """The VM's SafeKit-style state per node, from `cluster status` on `node`."""
        st = self.json(node, "cluster", "status")
        return next((v["states"] for v in st["vms"] if v["vm"] == self.vm), {})

    def qemu_nodes(self) -> list[str]:
        """The nodes where a QEMU process of the VM exists right now (the ground truth
        for "exactly one copy runs", whatever each node's Pacemaker believes)."""
        out = []
        for n in self.lab.nodes:
            # the qemu driver's QEMU names the VM; libvirt's names the domain
            marks = [f"process=vmreplica-{self.vm}" if self.driver == "qemu"
                     else f"guest=vmr-{n}-{self.vm},"]
            if self.existing:
                marks.append(f"guest={self.vm},")
            for pid in self.lab.processes(n):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                    if any(m.encode() in cmdline for m in marks):
                        out.append(n)
                        break
                except OSError:
                    continue
        return out

    def dashboard(self, node: str) -> str:
        """The dashboard's front page as `node` serves it: log in with a one-time token
        from `vmreplica dashboard`, then GET / with the session cookie (inside the node:
        its addresses exist only in its network namespace)."""
        url = self.json(node, "dashboard")["url"]
        script = (
            "import http.cookiejar, ssl, sys, urllib.request\n"
            "ctx = ssl.create_default_context(); ctx.check_hostname = False\n"
            "ctx.verify_mode = ssl.CERT_NONE\n"
            "op = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx),\n"
            "    urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))\n"
            "op.open(sys.argv[1], timeout=30).read()\n"
            "base = sys.argv[1].split('/', 3)[:3]\n"
            "sys.stdout.write(op.open('/'.join(base) + '/', timeout=30).read().decode())\n")
        p = self.lab.run(node, [sys.executable, "-c", script, url], timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"dashboard on {node}: {p.stderr.strip()[-500:]}")
        return p.stdout

    def records(self, node: str, timeout: float = 60.0) -> dict:
        """The demo guest's records on ``node``'s disk. While a failed-over VM's chain is
        merged into its base (the reverse after a takeover), libvirt's commit job keeps
        other readers off the layers, `-U` or not: read again once it is done."""
        deadline = time.monotonic() + timeout
        while True:
            disk = self.json(node, "vm", "show", self.vm)["disks"][-1]["path"]
            try:
                return read_demo_records(disk)
            except UsageError as e:
                if "lock" not in e.message or time.monotonic() > deadline:
                    raise
            time.sleep(0.25)

    # -- building it -----------------------------------------------------------------------

    def build(self, wait: Callable, *, stop_mode: str = "stop",
              protect: tuple[str, ...] = ()) -> None:
        """Daemons on both nodes, trust, the demo guest on the first node, protected
        (``protect``: more options of `cluster protect`)."""
        first, second = self.lab.nodes
        for n in self.lab.nodes:
            self.vmr(n, "init", "--name", n, "--listen", self.addr(n), "--accel", "tcg",
                     "--web", f"{self.lab.address(n)}:{PORT + 1}", "--driver", self.driver)
            self.vmr(n, "serve", "--detach")
        token = self.vmr(second, "trust", "token").stdout.strip().splitlines()[-1]
        self.vmr(first, "trust", "pair", self.addr(second), token)
        for n in self.lab.nodes:
            self.vmr(n, "replica-server", "enable", "--allow", self.other(n))
        if self.existing:
            self.define_existing(first)
        else:
            self.vmr(first, "vm", "create", self.vm, "--disk", "64M", "--disk", "32M",
                     "--guest", "demo")
        self.vmr(first, "vm", "start", self.vm)
        wait("the guest's records", lambda: (self.records(first)["top"] or 0) >= 3)
        self.vmr(first, "cluster", "protect", self.vm, "--peer", self.addr(second), "--homes",
                 ",".join(f"{n}={h}" for n, h in self.homes.items()), "--prefer", first,
                 "--stop-mode", stop_mode, "--stop-timeout", "20", "--point-interval", "1h",
                 *protect)
        wait("PRIM/SECOND", lambda: self.states(first) == {first: "PRIM", second: "SECOND"},
             timeout=120)

    def define_existing(self, node: str) -> None:
        """The operator's domain on ``node``: the demo guest with two qcow2 disks of its
        own (outside any vmreplica home) and a NIC on the network NETWORK, which each
        node's libvirtd has, defined with virsh in the node's libvirtd. NETWORK is a
        bridge of the node's network namespace, made here, that libvirt only uses
        (forward mode bridge): the namespace outlives a power-off, and so would a bridge
        libvirt made, which its libvirtd then fails to make again at the next boot
        ("File exists": the network stays inactive, the domain cannot start)."""
        bridge = f"{NETWORK}0"
        for n in self.lab.nodes:
            xml = self.images / f"{NETWORK}-{n}.xml"
            self.images.mkdir(parents=True, exist_ok=True)
            xml.write_text(f"<network><name>{NETWORK}</name><forward mode='bridge'/>"
                           f"<bridge name='{bridge}'/></network>\n")
            for argv in (["ip", "link", "add", bridge, "type", "bridge"],
                         ["ip", "link", "set", bridge, "up"]):
                p = self.lab.run(n, argv)
                if p.returncode != 0:
                    raise RuntimeError(f"[{n}] {' '.join(argv)}: {p.stdout}{p.stderr}")
            for verb in (["net-define", str(xml)], ["net-autostart", NETWORK],
                         ["net-start", NETWORK]):
                p = self.lab.run(n, ["virsh", "-q", "-c", "qemu:///system", *verb])
                if p.returncode != 0:
                    raise RuntimeError(f"[{n}] virsh {' '.join(verb)}: {p.stdout}{p.stderr}")
        self.images.chmod(0o755)                # (libvirt-qemu opens the disks)
        disks = []
        for target, size in (("vda", "64M"), ("vdb", "32M")):
            path = self.images / f"{target}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
                           check=True)
            disks.append(("file", str(path), "qcow2", target))
        xml = self.images / "domain.xml"
        xml.write_text(demo_domain_xml(self.vm, disks, acpi=True, nics=[(NETWORK, MAC)]))
        if self.echo:
            self.echo(f"[{node}]$ virsh define {xml}")
        p = self.lab.run(node, ["virsh", "-q", "-c", "qemu:///system", "define", str(xml)])
        if p.returncode != 0:
            raise RuntimeError(f"[{node}] virsh define {xml}: {p.stdout}{p.stderr}")

    def add_dr_site(self, name: str = "drsite") -> str:
        """A third vmreplica host, the disaster-recovery site, on the witness machine (a
        network both nodes reach, as a remote site's would be): a replica server for both
        nodes, paired with each. Returns its address."""
        if not self.lab.witness:
            raise LabError("the DR site runs on the witness machine: the lab has none")
        self.homes["witness"] = self.homes[self.lab.nodes[0]].parent / name
        addr = f"{self.lab.witness_address()}:{PORT}"
        self.vmr("witness", "init", "--name", name, "--listen", addr, "--accel", "tcg")
        self.vmr("witness", "serve", "--detach")
        self.vmr("witness", "replica-server", "enable", "--allow", "node*")
        for n in self.lab.nodes:
            token = self.vmr("witness", "trust", "token").stdout.strip().splitlines()[-1]
            self.vmr(n, "trust", "pair", addr, token)
        return addr

    def quiesce(self) -> None:
        """Before tearing the lab down: maintenance mode, so Pacemaker does not fight it."""
        for n in self.lab.nodes:
            if self.lab.is_on(n):
                self.lab.run(n, ["crm_attribute", "--type", "crm_config", "--name",
                                 "maintenance-mode", "--update", "true"], timeout=20)


def poll(what: str, fn: Callable, timeout: float = 60, every: float = 0.25):
    """Poll fn until it returns something truthy (returned); TimeoutError naming `what`
    (the lab's wait_for: exceptions while the cluster converges count as "not yet")."""
    try:
        return wait_for(fn, timeout, every, what=what)
    except LabError as e:
        raise TimeoutError(str(e)) from None


def events_tail(home: Path, n: int = 80) -> str:
    """The last events of a node's home, read from its store (the daemon may be down):
    the tests print them with a failure."""
    import sqlite3
    try:
        db = sqlite3.connect(f"file:{Path(home) / 'state.db'}?mode=ro", uri=True, timeout=5)
        rows = db.execute("SELECT ts, vm, kind, message FROM events ORDER BY id DESC "
                          "LIMIT ?", (n,)).fetchall()
        db.close()
    except sqlite3.Error as e:
        return f"(no events: {e})"
    return "\n".join(f"{time.strftime('%H:%M:%S', time.localtime(ts))} {vm or '-'} "
                     f"{kind}: {msg}" for ts, vm, kind, msg in reversed(rows))
