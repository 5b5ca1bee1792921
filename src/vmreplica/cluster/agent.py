"""OCF resource agents (Pacemaker): `ocf:vmreplica:vm` — one per protected VM — and
`ocf:vmreplica:daemon` — the vmreplica daemon of each node, cloned.

`vm` start makes this node the VM's primary (a planned hand-over when the peer is up,
an unplanned failover from the newest state when it was fenced) and starts the VM;
stop uses the stop mode (`stop`: guest shutdown, power-off after stop_timeout; `save`:
memory state to disk, resumed by the next start on this node; `off`: power off);
monitor is the VM checker: the QEMU process, its run state over QMP, and the guest
agent when the VM has one. "Restart in place up to 3 times in 24 h, then move" is
Pacemaker's `migration-threshold=4` (the 4th failure moves it) with
`failure-timeout=24h` (older failures are forgotten), set by `vmreplica cluster protect`.

Installed as small scripts under /usr/lib/ocf/resource.d/vmreplica/ (see install()).
Parameters come from OCF_RESKEY_*; exit codes are the OCF ones.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_PERM, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 4, 5, 6, 7

PROVIDER_DIR = Path("/usr/lib/ocf/resource.d/vmreplica")

VM_META = """<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="vm" version="1.0">
  <version>1.1</version>
  <longdesc lang="en">A VM protected by vmreplica: continuous replication between the two
nodes, this resource runs it where Pacemaker says. start makes this node the VM's primary
(planned hand-over from a live peer, unplanned failover from the newest state when the
peer was fenced) and starts the VM; stop stops it with the stop mode; monitor checks the
QEMU process, its run state and the guest agent. For "restart 3 times in 24 h, then move"
use meta migration-threshold=4 failure-timeout=24h (vmreplica cluster protect does).</longdesc>
  <shortdesc lang="en">A vmreplica-protected VM</shortdesc>
  <parameters>
    <parameter name="vm" unique="1" required="1">
      <longdesc lang="en">The VM's name (the same on both nodes).</longdesc>
      <shortdesc lang="en">VM name</shortdesc>
      <content type="string"/>
    </parameter>
    <parameter name="homes" required="1">
      <longdesc lang="en">Each node's vmreplica home: node1=/path,node2=/path (the node
name as `uname -n` says).</longdesc>
      <shortdesc lang="en">vmreplica homes per node</shortdesc>
      <content type="string"/>
    </parameter>
    <parameter name="stop_mode">
      <longdesc lang="en">stop: shut the guest down (agent, then ACPI), power off after
stop_timeout; save: save the memory state to disk and resume from it at the next start on
this node; off: power off at once.</longdesc>
      <shortdesc lang="en">stop, save or off</shortdesc>
      <content type="string" default="stop"/>
    </parameter>
    <parameter name="agent_grace">
      <longdesc lang="en">Seconds after the VM's start during which a silent guest agent
is not a failure (the guest is still booting). After it, a guest agent that does not
answer guest-ping makes the monitor fail (restart in place, then move).</longdesc>
      <shortdesc lang="en">guest agent boot grace</shortdesc>
      <content type="integer" default="120"/>
    </parameter>
    <parameter name="stop_timeout">
      <longdesc lang="en">Seconds a clean shutdown may take before the VM is powered off.</longdesc>
      <shortdesc lang="en">shutdown timeout</shortdesc>
      <content type="integer" default="60"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="300s"/>
    <action name="stop" timeout="180s"/>
    <action name="monitor" timeout="30s" interval="5s" depth="0"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="10s"/>
  </actions>
</resource-agent>
"""

DAEMON_META = """<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="daemon" version="1.0">
  <version>1.1</version>
  <longdesc lang="en">The vmreplica daemon of a node (clone it on both nodes): it receives
replication, runs the cycles and mirrors, and serves the management API the vm agent uses.</longdesc>
  <shortdesc lang="en">vmreplica daemon</shortdesc>
  <parameters>
    <parameter name="homes" required="1">
      <longdesc lang="en">Each node's vmreplica home: node1=/path,node2=/path.</longdesc>
      <shortdesc lang="en">vmreplica homes per node</shortdesc>
      <content type="string"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="60s"/>
    <action name="stop" timeout="120s"/>
    <action name="monitor" timeout="20s" interval="10s" depth="0"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="10s"/>
  </actions>
</resource-agent>
"""


def _param(name: str, default: str = "") -> str:
    return os.environ.get(f"OCF_RESKEY_{name}", default)


def _log(msg: str) -> None:
    sys.stderr.write(f"vmreplica-agent: {msg}\n")


def node_name() -> str:
    return socket.gethostname().split(".")[0]


def home() -> Path | None:
    spec = _param("homes") or ""
    me = node_name()
    for part in spec.split(","):
        name, _, path = part.strip().partition("=")
        if name == me and path:
            return Path(path)
    return None


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("vmreplica")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vmreplica.cli.main"]
    return subprocess.run(cmd + ["--home", str(home()), *args], capture_output=True, text=True,
                          timeout=timeout)


def daemon_running() -> bool:
    return cli("host", "--json", timeout=20).returncode == 0


def ensure_daemon() -> bool:
    if daemon_running():
        return True
    p = cli("serve", "--detach", timeout=60)
    if p.returncode != 0:
        _log(f"cannot start the vmreplica daemon: {p.stderr.strip()}")
    return daemon_running()


# -- ocf:vmreplica:daemon -------------------------------------------------------------------

def daemon_agent(action: str) -> int:
    if action == "meta-data":
        print(DAEMON_META)
        return OCF_SUCCESS
    h = home()
    if h is None or not (h / "state.db").exists():
        return OCF_ERR_CONFIGURED if action in ("start", "validate-all") else OCF_NOT_RUNNING
    if action == "validate-all":
        return OCF_SUCCESS
    if action == "start":
        return OCF_SUCCESS if ensure_daemon() else OCF_ERR_GENERIC
    if action == "stop":
        cli("shutdown", timeout=100)
        return OCF_SUCCESS if not daemon_running() else OCF_ERR_GENERIC
    if action == "monitor":
        return OCF_SUCCESS if daemon_running() else OCF_NOT_RUNNING
    return OCF_ERR_UNIMPLEMENTED


# -- ocf:vmreplica:vm -----------------------------------------------------------------------

def _vm_state(vm: str) -> dict | None:
    p = cli("vm", "show", vm, "--json", timeout=30)
    return json.loads(p.stdout) if p.returncode == 0 else None


def vm_monitor(vm: str, agent_checked: bool = True) -> int:
    if not daemon_running():
        # The daemon is managed by its own resource; without it, look at the process.
        return OCF_NOT_RUNNING
    p = cli("vm", "check", vm, "--json", timeout=25)
    if p.returncode != 0:
        _log(f"{vm}: vm check failed: {p.stderr.strip()}")
        return OCF_NOT_RUNNING
    chk = json.loads(p.stdout)
    if not chk["process"]:
        return OCF_NOT_RUNNING
    # "paused" is vmreplica's own brief freeze (a cycle's or a hand-over's); io-error,
    # internal-error, guest-panicked, shutdown... are failures.
    if chk["qmp"] not in ("running", "paused", "inmigrate", "prelaunch", "finish-migrate",
                          "postmigrate", "restore-vm", "save-vm"):
        _log(f"{vm}: QEMU runs but the VM is {chk['qmp']}")
        return OCF_ERR_GENERIC
    if chk["agent"] not in (None, "ok") and agent_checked and \
            (chk.get("uptime") or 0) > float(_param("agent_grace", "120")):
        _log(f"{vm}: the guest agent does not answer: {chk['agent']}")
        return OCF_ERR_GENERIC
    return OCF_SUCCESS


def vm_start(vm: str) -> int:
    if not ensure_daemon():
        return OCF_ERR_GENERIC
    if vm_monitor(vm) == OCF_SUCCESS:
        return OCF_SUCCESS
    p = cli("cluster", "take-over", vm, timeout=280)
    if p.returncode != 0:
        _log(f"{vm}: taking over failed: {p.stderr.strip()}")
        return OCF_ERR_GENERIC
    st = _vm_state(vm)
    if st is None or st["state"] != "running":
        p = cli("vm", "start", vm, timeout=120)
        if p.returncode != 0:
            _log(f"{vm}: start failed: {p.stderr.strip()}")
            return OCF_ERR_GENERIC
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if vm_monitor(vm, agent_checked=False) == OCF_SUCCESS:   # the guest may still boot
            return OCF_SUCCESS
        time.sleep(0.5)
    p = cli("vm", "check", vm, "--json", timeout=25)
    _log(f"{vm}: started but not running after 60 s: {p.stdout.strip()} {p.stderr.strip()}")
    return OCF_ERR_GENERIC


def vm_stop(vm: str) -> int:
    if not daemon_running() and not ensure_daemon():
        return OCF_ERR_GENERIC
    st = _vm_state(vm)
    if st is None or st["state"] != "running":
        return OCF_SUCCESS
    mode = _param("stop_mode", "stop")
    if mode == "save":
        p = cli("vm", "save", vm, timeout=170)
    elif mode == "off":
        p = cli("vm", "stop", vm, "--force", timeout=60)
    else:
        p = cli("vm", "stop", vm, "--timeout", _param("stop_timeout", "60"), timeout=170)
    if p.returncode != 0:
        _log(f"{vm}: stop ({mode}) failed: {p.stderr.strip()}; powering off")
        cli("vm", "stop", vm, "--force", timeout=60)
    st = _vm_state(vm)
    return OCF_SUCCESS if st is None or st["state"] != "running" else OCF_ERR_GENERIC


def vm_agent(action: str) -> int:
    if action == "meta-data":
        print(VM_META)
        return OCF_SUCCESS
    vm = _param("vm")
    if not vm or home() is None:
        return OCF_ERR_CONFIGURED
    if _param("stop_mode", "stop") not in ("stop", "save", "off"):
        return OCF_ERR_CONFIGURED
    if action == "validate-all":
        return OCF_SUCCESS
    if action == "start":
        return vm_start(vm)
    if action == "stop":
        return vm_stop(vm)
    if action in ("monitor", "status"):
        return vm_monitor(vm)
    return OCF_ERR_UNIMPLEMENTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: agent.py vm|daemon ACTION", file=sys.stderr)
        return OCF_ERR_ARGS
    kind, action = argv[0], argv[1]
    try:
        return (vm_agent if kind == "vm" else daemon_agent)(action)
    except subprocess.TimeoutExpired as e:
        _log(f"timed out: {e}")
        return OCF_ERR_GENERIC


def install(directory: Path = PROVIDER_DIR) -> list[Path]:
    """Write the agents as executables Pacemaker finds (ocf:vmreplica:vm, :daemon)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for kind in ("vm", "daemon"):
        p = directory / kind
        p.write_text(f"#!/bin/sh\n# vmreplica OCF resource agent (ocf:vmreplica:{kind})\n"
                     f"exec {sys.executable} -m vmreplica.cluster.agent {kind} \"$@\"\n")
        p.chmod(0o755)
        out.append(p)
    return out


if __name__ == "__main__":
    sys.exit(main())
