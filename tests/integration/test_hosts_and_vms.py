"""Hosts (init, serve, shutdown) and VMs on the embedded qemu driver, with real daemons."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from harness import lab

pytestmark = pytest.mark.integration


def _cli(*args, env=None):
    return subprocess.run(lab.cli_path() + list(args), capture_output=True, text=True,
                          env=env, timeout=120)


def test_host_lifecycle_and_home_from_environment(fresh_dir):
    home = fresh_dir / "h"
    port = lab.free_port()
    env = dict(os.environ, VMREPLICA_HOME=str(home))
    p = _cli("init", "--name", "Site-X", "--listen", f"127.0.0.1:{port}", "--accel", "tcg", env=env)
    assert p.returncode == 0, p.stderr
    assert (home / "state.db").exists() and (home / "tls" / "host.key").stat().st_mode & 0o077 == 0
    assert "sha256:" in p.stdout and "serve --detach" in p.stdout
    p = _cli("serve", "--detach", env=env)
    assert p.returncode == 0, p.stderr
    info = lab.LabHost(home, "site-x", port).json("host")
    assert info["name"] == "site-x" and info["listen"] == f"127.0.0.1:{port}"
    # A second daemon for the same home is refused; the first keeps running.
    p = _cli("serve", env=env)
    assert p.returncode == 2 and "already runs" in p.stderr
    p = _cli("shutdown", env=env)
    assert p.returncode == 0 and "stopped" in p.stdout
    assert not (home / "run" / "mgmt.sock").exists()
    p = _cli("vm", "list", env=env)
    assert p.returncode == 1 and "no vmreplica daemon is running" in p.stderr \
        and "serve --detach" in p.stderr


def test_host_bad_input(fresh_dir):
    h = lab.LabHost(fresh_dir / "h", "site-y").init()
    p = h.run("init", "--name", "site-y", "--listen", h.address, check=False)
    assert p.returncode == 2 and "already a vmreplica home" in p.stderr
    p = _cli("--home", str(fresh_dir / "z"), "init", "--name", "bad name", "--listen", "127.0.0.1:1")
    assert p.returncode == 2 and "invalid host name" in p.stderr
    p = _cli("--home", str(fresh_dir / "z"), "init", "--name", "ok", "--listen", "127.0.0.1:99999")
    assert p.returncode == 2 and "invalid port" in p.stderr
    p = _cli("--home", str(fresh_dir / "nothing"), "vm", "list")
    assert p.returncode == 2 and "not a vmreplica host home" in p.stderr and "init" in p.stderr
    p = _cli("vm", "list", env={k: v for k, v in os.environ.items() if k != "VMREPLICA_HOME"})
    assert p.returncode == 2 and "VMREPLICA_HOME" in p.stderr
    # The replication port is taken: serve fails with the reason, leaves no socket behind.
    with socket.socket() as s:
        s.bind(("127.0.0.1", h.port))
        s.listen(1)
        p = h.run("serve", "--detach", check=False)
    assert p.returncode != 0 and "cannot listen on" in p.stderr
    assert not (h.home / "run" / "mgmt.sock").exists()


def test_vm_lifecycle(sites, vm_name):
    a, _ = sites
    vm = a.json("vm", "create", vm_name, "--disk", "64M", "--disk", "1G", "--memory", "128")
    assert vm["state"] == "stopped" and vm["role"] == "none" and vm["memory_mb"] == 128
    assert [(d["name"], d["format"], d["virtual_size"]) for d in vm["disks"]] == [
        ("disk0", "qcow2", 64 << 20), ("disk1", "qcow2", 1 << 30)]
    assert all(Path(d["path"]).exists() for d in vm["disks"])
    assert vm_name in {v["name"] for v in a.json("vm", "list")}
    assert "running" in a.run("vm", "start", vm_name).stdout
    shown = a.vm(vm_name)
    assert shown["state"] == "running" and shown["pid"]
    p = a.run("vm", "delete", vm_name, check=False)
    assert p.returncode == 2 and "running" in p.stderr
    p = a.run("vm", "create", vm_name, "--disk", "1G", check=False)
    assert p.returncode == 2 and f"a VM named {vm_name} exists" in p.stderr, p.stderr
    a.run("vm", "stop", vm_name, "--force")
    assert a.vm(vm_name)["state"] == "stopped"
    a.run("vm", "delete", vm_name)
    assert not (a.home / "vms" / vm_name).exists()
    p = a.run("vm", "show", vm_name, check=False)
    assert p.returncode == 2 and f"no VM named {vm_name}" in p.stderr


def test_vm_save_resumes_without_a_reboot_and_check(sites, vm_name, monkeypatch):
    """`vm save` (the cluster's `save` stop mode) ends QEMU with the memory state on disk
    (libvirt: its managed save); the next `vm start` resumes it: the guest's records
    continue and it does not boot again (the serial console, rewritten at each start,
    does not show its init starting, where the cold boot before it did). `vm check` is
    the VM checker's view; the cluster's resource agent (its monitor, and its stop in
    `save` mode) runs against the host as Pacemaker runs it, on both drivers."""
    import time

    from vmreplica.cluster import agent
    from vmreplica.hypervisor.guest import read_demo_records

    a, _ = sites
    monkeypatch.setenv("OCF_RESKEY_vm", vm_name)
    monkeypatch.setenv("OCF_RESKEY_homes", f"{agent.node_name()}={a.home}")
    monkeypatch.setenv("OCF_RESKEY_stop_mode", "save")
    a.run("vm", "create", vm_name, "--disk", "32M", "--guest", "demo")
    disk = a.vm(vm_name)["disks"][-1]["path"]

    def resumed_after(start_cmd):
        before = read_demo_records(disk)["top"] or 0
        t0 = time.monotonic()
        a.run(*start_cmd)
        while (read_demo_records(disk)["top"] or 0) <= before + 1:
            assert time.monotonic() - t0 < 120, "the guest never wrote"
            time.sleep(0.05)
        return time.monotonic() - t0

    console = a.home / "vms" / vm_name / "console.log"
    cold = resumed_after(["vm", "start", vm_name])
    assert "writer on" in console.read_text(errors="replace")      # the guest's init ran
    chk = a.json("vm", "check", vm_name)
    assert chk["process"] and chk["qmp"] == "running" and chk["uptime"] >= 0, chk
    assert agent.vm_monitor(vm_name) == agent.OCF_SUCCESS
    assert agent.vm_stop(vm_name) == agent.OCF_SUCCESS          # stop mode save: `vm save`
    assert a.vm(vm_name)["state"] == "stopped"
    assert any("VM state saved" in e["message"] for e in a.json("events", vm_name))
    assert not a.json("vm", "check", vm_name)["process"]
    assert agent.vm_monitor(vm_name) == agent.OCF_NOT_RUNNING
    warm = resumed_after(["vm", "start", vm_name])
    assert agent.vm_monitor(vm_name) == agent.OCF_SUCCESS
    print(f"cold boot to the next record {cold:.2f} s, resume from the saved state {warm:.2f} s")
    assert "writer on" not in console.read_text(errors="replace")  # no second boot
    rec = read_demo_records(disk)
    assert rec["gap_at"] is None
    a.run("vm", "stop", vm_name, "--force")
    a.run("vm", "delete", vm_name)
