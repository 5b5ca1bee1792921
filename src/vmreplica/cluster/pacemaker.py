"""Talking to Pacemaker with its own tools (cibadmin, crm_mon, crm_resource) on this node,
and the cluster configuration `vmreplica cluster setup` writes or prints."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

from ..errors import OperationError, UsageError

DAEMON_RSC = "vmreplica-daemon"
DAEMON_CLONE = "vmreplica-daemon-clone"


def rsc(vm: str) -> str:
    return f"vm-{vm}"


def _run(args: list[str], what: str, check: bool = True, timeout: float = 60,
         input: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise OperationError(f"{args[0]} is not installed: this host is not a Pacemaker node",
                             hint="install pacemaker and corosync (make setup does)")
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise OperationError(f"{what} failed: {(p.stderr or p.stdout).strip()}")
    return p


def status_xml() -> ET.Element:
    p = _run(["crm_mon", "--output-as=xml", "--one-shot", "--inactive"], "crm_mon",
             check=False)
    if not p.stdout.strip().startswith("<"):
        raise OperationError(f"Pacemaker does not answer on this node: {p.stderr.strip()}",
                             hint="is this node in a running cluster?")
    return ET.fromstring(p.stdout)


def nodes_and_resources() -> dict:
    """{nodes: {name: online}, resources: {id: [nodes it is active on]}, quorum: bool,
    failcounts: {(rsc, node): n}}"""
    root = status_xml()
    nodes = {n.get("name"): n.get("online") == "true" for n in root.iter("node")
             if n.get("name") and n.get("online") is not None}
    resources: dict[str, list[str | None]] = {}
    for r in root.iter("resource"):
        rid = r.get("id")
        if not rid:
            continue
        resources.setdefault(rid, [])
        if r.get("active") == "true":
            resources[rid] += [n.get("name") for n in r.findall("node")]
    summary = root.find("summary/current_dc")
    quorum = summary is not None and summary.get("with_quorum") == "true"
    fails = {}
    for node in root.iter("node"):
        for h in node.findall("resource_history"):
            count = h.get("fail-count")
            if count:
                fails[(h.get("id"), node.get("name"))] = int(count)
    return {"nodes": nodes, "resources": resources, "quorum": quorum, "failcounts": fails}


def _cib_create(section: str, xml: str) -> None:
    _run(["cibadmin", "--create", "-o", section, "-X", xml], f"adding to the CIB ({section})")


def _exists(rid: str) -> bool:
    p = _run(["cibadmin", "--query", "--xpath", f"//*[@id='{rid}']"], "cibadmin", check=False)
    return p.returncode == 0 and rid in p.stdout


def ensure_daemon_clone(homes: str) -> None:
    if _exists(DAEMON_CLONE):
        return
    _cib_create("resources", (
        f'<clone id="{DAEMON_CLONE}"><meta_attributes id="{DAEMON_CLONE}-meta">'
        f'<nvpair id="{DAEMON_CLONE}-interleave" name="interleave" value="true"/>'
        f'</meta_attributes>'
        f'<primitive id="{DAEMON_RSC}" class="ocf" provider="vmreplica" type="daemon">'
        f'<instance_attributes id="{DAEMON_RSC}-ia">'
        f'<nvpair id="{DAEMON_RSC}-homes" name="homes" value={quoteattr(homes)}/>'
        f'</instance_attributes><operations>'
        f'<op id="{DAEMON_RSC}-mon" name="monitor" interval="10s" timeout="20s"/>'
        f'<op id="{DAEMON_RSC}-start" name="start" interval="0" timeout="60s"/>'
        f'<op id="{DAEMON_RSC}-stop" name="stop" interval="0" timeout="120s"/>'
        f'</operations></primitive></clone>'))


def add_vm_resource(vm: str, homes: str, stop_mode: str, stop_timeout: int, prefer: str | None,
                    monitor_interval: int = 5) -> str:
    """The VM's primitive: restart in place up to 3 times in 24 h, then move
    (migration-threshold=4: the 4th failure moves it; failure-timeout=24h forgets older
    ones); it sticks where it runs (resource-stickiness) and starts after the daemon."""
    r = rsc(vm)
    if _exists(r):
        raise UsageError(f"{vm} is already protected by the cluster ({r})")
    params = {"vm": vm, "homes": homes, "stop_mode": stop_mode,
              "stop_timeout": str(stop_timeout)}
    nv = "".join(f'<nvpair id="{r}-{k}" name="{k}" value={quoteattr(v)}/>'
                 for k, v in params.items())
    _cib_create("resources", (
        f'<primitive id="{r}" class="ocf" provider="vmreplica" type="vm">'
        f'<instance_attributes id="{r}-ia">{nv}</instance_attributes>'
        f'<meta_attributes id="{r}-meta">'
        f'<nvpair id="{r}-mt" name="migration-threshold" value="4"/>'
        f'<nvpair id="{r}-ft" name="failure-timeout" value="24h"/>'
        f'<nvpair id="{r}-st" name="resource-stickiness" value="100"/>'
        f'</meta_attributes><operations>'
        f'<op id="{r}-mon" name="monitor" interval="{monitor_interval}s" timeout="30s"/>'
        f'<op id="{r}-start" name="start" interval="0" timeout="300s"/>'
        f'<op id="{r}-stop" name="stop" interval="0" timeout="{stop_timeout + 60}s"/>'
        f'</operations></primitive>'))
    _cib_create("constraints", (
        f'<rsc_order id="{r}-after-daemon" first="{DAEMON_CLONE}" then="{r}" kind="Mandatory"/>'))
    _cib_create("constraints", (
        f'<rsc_colocation id="{r}-with-daemon" rsc="{r}" with-rsc="{DAEMON_CLONE}" '
        f'score="INFINITY"/>'))
    if prefer:
        _cib_create("constraints", (
            f'<rsc_location id="{r}-prefers" rsc="{r}" node={quoteattr(prefer)} score="50"/>'))
    return r


def remove_vm_resource(vm: str) -> None:
    r = rsc(vm)
    _run(["crm_resource", "--resource", r, "--set-parameter", "target-role", "--meta",
          "--parameter-value", "Stopped"], "stopping the resource", check=False)
    for cid in (f"{r}-after-daemon", f"{r}-with-daemon", f"{r}-prefers"):
        _run(["cibadmin", "--delete", "--xml-text", f'<rsc_order id="{cid}"/>'], "cibadmin",
             check=False)
        _run(["cibadmin", "--delete", "--xpath", f"//*[@id='{cid}']"], "cibadmin", check=False)
    _run(["cibadmin", "--delete", "--xpath", f"//primitive[@id='{r}']"], "cibadmin",
         check=False)


def set_maintenance(vm: str, on: bool) -> None:
    """The VM checker suspended (maintenance: no monitor, no recovery, no failover)."""
    _run(["crm_resource", "--resource", rsc(vm), "--meta", "--set-parameter", "maintenance",
          "--parameter-value", "true" if on else "false"], "setting maintenance")


def move(vm: str, node: str) -> None:
    _run(["crm_resource", "--resource", rsc(vm), "--move", "--node", node], "moving the VM")


def clear_move(vm: str) -> None:
    _run(["crm_resource", "--resource", rsc(vm), "--clear"], "clearing the move", check=False)


def cleanup(vm: str) -> None:
    _run(["crm_resource", "--resource", rsc(vm), "--cleanup"], "cleanup", check=False)


# -- cluster setup -----------------------------------------------------------------------

def corosync_conf(name: str, nodes: list[tuple[str, str]], witness: str | None,
                  token: int = 3000) -> str:
    """corosync.conf for two nodes on knet, with a corosync-qnetd witness (ffsplit,
    wait_for_all: a node booting alone never takes quorum with the witness's vote and
    fences its peer) when given, else two_node (which cannot break a split by itself:
    fencing races)."""
    lines = ["# written by vmreplica cluster setup", "totem {", "    version: 2",
             f"    cluster_name: {name}", "    transport: knet", f"    token: {token}",
             "    crypto_cipher: aes256", "    crypto_hash: sha256", "}", "", "nodelist {"]
    for i, (node, addr) in enumerate(nodes, 1):
        lines += ["    node {", f"        name: {node}", f"        nodeid: {i}",
                  f"        ring0_addr: {addr}", "    }"]
    lines += ["}", "", "quorum {", "    provider: corosync_votequorum"]
    if witness:
        lines += ["    wait_for_all: 1", "    device {", "        model: net",
                  "        votes: 1", "        net {", f"            host: {witness}",
                  "            algorithm: ffsplit", "            tls: on", "        }", "    }"]
    else:
        lines += ["    two_node: 1"]
    lines += ["}", "", "logging {", "    to_logfile: yes",
              "    logfile: /var/log/corosync/corosync.log", "    to_stderr: no",
              "    to_syslog: no", "    timestamp: on", "}", ""]
    return "\n".join(lines)


def cib_bootstrap(name: str, nodes: list[str], fence_agent: str | None,
                  fence_options: dict[str, str] | None = None,
                  properties: dict[str, str] | None = None, two_node: bool = False) -> str:
    """The seed CIB of a new cluster (`/var/lib/pacemaker/cib/cib.xml`, owned by
    hacluster, before Pacemaker's first start): fencing on with one device per node that
    never runs on the node it fences (or off, when no agent is given), quorum loss stops
    resources, resources stick where they run. Without a witness (`two_node`) the first
    node's device waits 2 s, so that a fencing race has one winner."""
    props = {"stonith-enabled": "true" if fence_agent else "false",
             "no-quorum-policy": "stop", "cluster-name": name, **(properties or {})}
    nv = "".join(f'        <nvpair id="opt-{k}" name="{k}" value={quoteattr(v)}/>\n'
                 for k, v in props.items())
    prims, cons = "", ""
    for i, n in enumerate(nodes if fence_agent else []):
        attrs = {"pcmk_host_list": n, "pcmk_host_check": "static-list", **(fence_options or {})}
        if i == 0 and two_node:
            attrs.setdefault("pcmk_delay_base", "2s")
        ia = "".join(f'          <nvpair id="fence-{n}-{k}" name="{k}" value={quoteattr(v)}/>\n'
                     for k, v in attrs.items())
        prims += (f'      <primitive id="fence-{n}" class="stonith" type={quoteattr(fence_agent or "")}>\n'
                  f'        <instance_attributes id="fence-{n}-ia">\n{ia}'
                  f'        </instance_attributes>\n'
                  f'        <operations>\n'
                  f'          <op id="fence-{n}-monitor" name="monitor" interval="30s"/>\n'
                  f'        </operations>\n      </primitive>\n')
        cons += (f'      <rsc_location id="fence-{n}-not-on-self" rsc="fence-{n}" '
                 f'node="{n}" score="-INFINITY"/>\n')
    return ('<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" '
            'num_updates="0" admin_epoch="0">\n  <configuration>\n    <crm_config>\n'
            f'      <cluster_property_set id="cib-bootstrap-options">\n{nv}'
            '      </cluster_property_set>\n    </crm_config>\n    <nodes/>\n'
            f'    <resources>\n{prims}    </resources>\n'
            f'    <constraints>\n{cons}    </constraints>\n'
            '    <rsc_defaults>\n      <meta_attributes id="rsc-defaults">\n'
            '        <nvpair id="rsc-defaults-stickiness" name="resource-stickiness" value="100"/>\n'
            '      </meta_attributes>\n    </rsc_defaults>\n'
            '  </configuration>\n  <status/>\n</cib>\n')


def pcs_commands(nodes: list[tuple[str, str]], fence_agent: str | None,
                 fence_options: list[str]) -> list[str]:
    """The Pacemaker side, as pcs commands for operators who use pcs."""
    out = ["pcs property set stonith-enabled=" + ("true" if fence_agent else "false"),
           "pcs property set no-quorum-policy=stop",
           "pcs resource defaults update resource-stickiness=100"]
    if fence_agent:
        for node, _ in nodes:
            opts = " ".join(fence_options)
            out.append(f"pcs stonith create fence-{node} {fence_agent} "
                       f"pcmk_host_list={node} {opts}".rstrip())
            out.append(f"pcs constraint location fence-{node} avoids {node}")
    return out
