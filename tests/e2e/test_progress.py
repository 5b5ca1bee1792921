"""Long operations say what they do (issue 17, items 3 and 4): on a terminal `sync`,
`remove` and the first `vm start` on a machine show progress or what they wait for;
`status --json` shows a running operation's progress; piped output stays quiet; the KVM
probe runs once per machine, not once per host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from harness import lab
from helpers import qemu_io

pexpect = pytest.importorskip("pexpect")
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("qemu_driver_only")]

BIG = 512 << 20


def _replicated_vm(a, b, name: str) -> str:
    """A powered-off VM replicated to ``b`` (initial copy done, nothing pending); returns
    its disk's path."""
    a.run("vm", "create", name, "--disk", "1G")
    a.run("enable", name, "--replica", b.address, "--frequency", "15m")
    a.run("initial", name)
    return a.vm(name)["disks"][0]["path"]


def _change(disk: str, tmp_path, size: int = BIG) -> None:
    """``size`` bytes of incompressible data written into ``disk`` (tracked: qemu-io
    keeps the disk's dirty bitmaps)."""
    src = tmp_path / "random.bin"
    with open(src, "wb") as f:
        f.writelines(os.urandom(1 << 20) for _ in range(size >> 20))
    qemu_io(disk, f"write -s {src} 0 {size}")
    src.unlink()


def _spawn(host, *args: str, timeout: float = 180):
    child = pexpect.spawn(lab.cli_path()[0], ["--home", str(host.home), *args],
                          encoding="utf-8", timeout=timeout, dimensions=(50, 250))
    child.logfile_read = sys.stdout
    return child


def test_sync_shows_progress_on_a_terminal_and_nothing_when_piped(sites, vm_name, tmp_path):
    a, b = sites
    disk = _replicated_vm(a, b, vm_name)
    _change(disk, tmp_path)
    child = _spawn(a, "sync", vm_name)
    try:
        # A redrawn line: bar, percentage, bytes of total, then the rate (and the time
        # left while there is some: on an idle machine 512 MiB ship in about a second).
        child.expect(rf"sync of {vm_name}: cycle \d+: \[#* *\] +\d+\.\d % \([\d.]+ [KMG]?i?B "
                     r"of 512\.0 MiB")
        child.expect(r"of 512\.0 MiB, [\d.]+ [KMG]iB/s(, ETA [\w ]+\)|\); the replica)")
        child.expect(rf"sync of {vm_name}: cycle \d+ acknowledged in")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    # Piped (a script): the report alone, as before.
    _change(disk, tmp_path, 64 << 20)
    proc = a.run("sync", vm_name)
    assert proc.stderr == ""
    assert re.fullmatch(rf"sync of {vm_name}: cycle \d+ acknowledged in [^\n]+; 64\.0 MiB "
                        r"changed, [^\n]+ sent\n", proc.stdout), proc.stdout
    a.run("remove", vm_name)


def test_status_json_shows_a_running_cycles_progress(sites, vm_name, tmp_path):
    a, b = sites
    disk = _replicated_vm(a, b, vm_name)
    _change(disk, tmp_path)
    assert a.json("status", vm_name)[0]["activity"] is None
    sync = subprocess.Popen(lab.cli_path() + ["--home", str(a.home), "sync", vm_name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        while sync.poll() is None and time.monotonic() < deadline:
            rel = a.json("status", vm_name)[0]
            op = rel["activity"]
            if op and "percent" in op:
                seen.append((op, rel["progress"]))
                if len(seen) >= 2:
                    break
            time.sleep(0.2)
        out, err = sync.communicate(timeout=300)
    finally:
        if sync.poll() is None:
            sync.kill()
    assert sync.returncode == 0, out + err
    assert err == ""                                       # not a terminal: no progress
    assert seen, "no progress seen in `status --json` while the cycle ran"
    op, progress = seen[-1]
    assert op["kind"] == "delta" and re.fullmatch(r"cycle \d+", op["label"])
    assert op["total"] == BIG and 0 <= op["done"] <= op["total"]
    assert 0.0 <= op["percent"] <= 100.0 and op["vm"] == vm_name
    assert progress == {"done": op["done"], "total": op["total"]}
    assert seen[0][0]["done"] <= seen[-1][0]["done"]
    rel = a.json("status", vm_name)[0]
    assert rel["activity"] is None and rel["progress"] is None     # done: nothing runs
    a.run("remove", vm_name)


def test_remove_says_it_waits_for_the_running_cycle(sites, vm_name, tmp_path):
    a, b = sites
    disk = _replicated_vm(a, b, vm_name)
    _change(disk, tmp_path)
    sync = subprocess.Popen(lab.cli_path() + ["--home", str(a.home), "sync", vm_name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sync.poll() is None:
            op = a.json("status", vm_name)[0]["activity"]
            if op and op.get("percent", 0) > 0:
                break
            time.sleep(0.1)
        child = _spawn(a, "remove", vm_name)
        try:
            child.expect(rf"remove {vm_name}: waiting for the running cycle \d+ of {vm_name} "
                         r"to end \(\d+\.\d %, running for ")
            child.expect(f"replication of {vm_name} removed")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 0
        sync.communicate(timeout=300)
    finally:
        if sync.poll() is None:
            sync.kill()
    assert all(r["vm"] != vm_name for r in a.json("status"))


def test_the_kvm_probe_runs_once_per_machine_and_says_so(fresh_dir, monkeypatch):
    """Two hosts with `--accel auto` on one machine: the first VM start probes (and says
    so on the terminal), the second host's first start reads the answer; `host
    probe-kvm` probes again."""
    from vmreplica.hypervisor import kvmprobe
    if kvmprobe._quick():
        pytest.skip(f"no probe on this machine: {kvmprobe._quick()[1]}")
    cache = fresh_dir / "cache"
    monkeypatch.setenv("VMREPLICA_CACHE_DIR", str(cache))   # this machine, as if fresh
    hosts = [lab.LabHost(fresh_dir / n, n, accel="auto").init().start()
             for n in ("site-p", "site-q")]
    p, q = hosts
    try:
        assert p.json("host")["accel"]["answer"] is None         # not probed yet
        p.run("vm", "create", "m1", "--disk", "16M")
        child = _spawn(p, "vm", "start", "m1", timeout=120)
        try:
            child.expect(r"probing whether KVM can boot a guest here \(once per machine, "
                         r"~20 s\)… \(")
            child.expect("m1: running")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 0
        record = json.loads((cache / "kvm-probe.json").read_text())
        assert record["key"] == kvmprobe.machine_key()
        assert record["accel"] in ("kvm", "tcg")
        assert _probes(p) == 1

        # The second host on this machine: no probe, a quick first start.
        q.run("vm", "create", "m2", "--disk", "16M")
        t0 = time.monotonic()
        q.run("vm", "start", "m2")
        took = time.monotonic() - t0
        assert _probes(q) == 0
        assert took < 10, f"the first start on the second host took {took:.1f} s"
        info = q.json("host")["accel"]
        assert (info["answer"], info["checked_at"]) == (record["accel"], record["checked_at"])
        assert "probed" in q.run("host").stdout

        # Probing again, on request.
        again = q.json("host", "probe-kvm", timeout=120)
        assert again["booted"] and again["answer"] == record["accel"]
        assert _probes(q) == 1
        newer = json.loads((cache / "kvm-probe.json").read_text())
        assert newer["checked_at"] > record["checked_at"]
    finally:
        lab.teardown(*hosts)


def _probes(host) -> int:
    return (host.home / "daemon.log").read_text().count("probing whether KVM can boot")
