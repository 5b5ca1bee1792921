"""Re-IP at failover, on the real Debian guest: an existing libvirt domain with a NIC on
a network is enabled with a network map and a failover IP (its NIC by MAC, gateway and
DNS server), and seeded; then, with the primary powered off:

- a bad `--failover-ip` is refused at `enable` and at `set`, and changes nothing on
  either host; `set` replaces, clears and re-sets the failover IPs (an index becomes the
  NIC's MAC) on both hosts;
- a test failover without `--re-ip` leaves the test VM's NIC without the address;
- a test failover with `--re-ip` sets the address, the default route and
  /etc/resolv.conf inside the test VM (seen through guest-network-get-interfaces and
  guest-exec), and a `re-ip` event says so;
- a re-IP that cannot be done (the test VM on no network: its NIC is not in the guest)
  is a warning on the relationship and the VM, the test failover itself runs;
- an unplanned failover sets the address in the failed-over VM, an event says so; the
  time from the failover command to the address being checked is printed.

Host names of their own (reip-a, reip-b), random domain and network names: the system
libvirtd may be shared with another run.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import lab
from harness.debian import (
    AGENT_TIMEOUT,
    BUILD_TIMEOUT,
    GUEST_CACHE,
    addresses,
    build,
    console_tail,
    domain_xml,
    guest_exec,
    must,
    virsh,
    wait_for_agent,
    wait_reip,
)
from harness.operator import network

pytestmark = pytest.mark.e2e

NAMES = ("reip-a", "reip-b")
MAC = "52:54:00:5e:19:01"
FAILOVER_IP = f"{MAC}=10.77.0.5/24,gw=10.77.0.1,dns=10.77.0.53"
RESOLV = "# written by vmreplica at failover (re-IP)\nnameserver 10.77.0.53\n"


def reip_events(host: lab.LabHost, vm: str) -> list[str]:
    return [e["message"] for e in host.json("events", vm) if e["kind"] == "re-ip"]


def failover_ips(host: lab.LabHost, vm: str) -> list[str]:
    return host.json("status", vm)[0]["failover_ips"]


@pytest.mark.timeout(BUILD_TIMEOUT + 1500)
def test_failover_ip_set_inside_the_guest(request, fresh_dir):
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest needs root")
    request.getfixturevalue("libvirtd")
    build()
    tag = secrets.token_hex(3)
    name = f"ops-{tag}"
    src_net, dst_net = f"vmrs-{tag}", f"vmrd-{tag}"
    work = Path(tempfile.mkdtemp(prefix="vmr-reip-", dir="/tmp"))
    os.chmod(work, 0o755)
    base, disk, console = work / "base.qcow2", work / "root.qcow2", work / "console.log"
    shutil.copyfile(GUEST_CACHE / "disk.qcow2", base)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(disk)], check=True)
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    replica_dom = f"vmr-{NAMES[1]}-{name}"
    test_dom = f"vmr-{NAMES[1]}-{name}-test"
    nets = []
    try:
        for net, br in ((src_net, f"vmrs{tag}"), (dst_net, f"vmrd{tag}")):
            network(net, br, work)
            nets.append(net)
        (work / "domain.xml").write_text(domain_xml(name, disk, console, src_net, MAC))
        must(virsh("define", str(work / "domain.xml")))
        mapping = ("--network-map", f"{src_net}={dst_net}")

        # Bad failover IPs: refused at enable, nothing made on either host.
        for bad, words in (("52:54:00:00:00:99=10.77.0.5/24",
                            f"{name} has no NIC with MAC 52:54:00:00:00:99"),
                           ("1=10.77.0.5/24", f"{name} has no NIC 1"),
                           (f"{MAC}=10.77.0.5", "has no prefix length"),
                           (f"{MAC}=10.77.0.5/24,gw=10.99.0.1", "is not in 10.77.0.0/24")):
            out = a.run("enable", name, "--replica", b.address, *mapping,
                        "--failover-ip", bad, check=False)
            assert out.returncode != 0 and words in out.stderr, (bad, out.stderr)
        assert all(r["vm"] != name for r in a.json("status") + b.json("status"))
        assert virsh("domstate", replica_dom).returncode != 0

        a.run("enable", name, "--replica", b.address, *mapping, "--failover-ip", FAILOVER_IP)
        assert failover_ips(a, name) == failover_ips(b, name) == [FAILOVER_IP]

        # `set`: a bad entry changes nothing; none clears; an index becomes the MAC.
        out = a.run("set", name, "--failover-ip", "0=10.77.0.300/24", check=False)
        assert out.returncode != 0 and "bad address '10.77.0.300/24'" in out.stderr, out.stderr
        out = a.run("set", name, "--failover-ip", "3=10.77.0.5/24", check=False)
        assert out.returncode != 0 and "has no NIC 3" in out.stderr \
            and f"0={MAC}" in out.stderr, out.stderr
        assert failover_ips(a, name) == failover_ips(b, name) == [FAILOVER_IP]
        a.run("set", name, "--failover-ip", "none")
        assert failover_ips(a, name) == failover_ips(b, name) == []
        a.run("set", name, "--failover-ip", "0=10.77.0.5/24,gw=10.77.0.1,dns=10.77.0.53")
        assert failover_ips(a, name) == failover_ips(b, name) == [FAILOVER_IP]

        # Seeded while the guest runs; then the power cut (every later step runs on the
        # replica host only: one guest at a time on this machine).
        must(virsh("start", name))
        wait_for_agent(name, AGENT_TIMEOUT)
        assert a.json("initial", name)["cycle"] >= 0
        must(virsh("destroy", name))

        # Test failover without --re-ip: the test VM's NIC keeps no failover address.
        test = b.json("failover", name, "--test")
        assert test["re_ip"] is None
        wait_for_agent(test_dom, AGENT_TIMEOUT)
        time.sleep(3)
        assert "10.77.0.5/24" not in addresses(test_dom, MAC)
        assert b.json("status", name)[0]["reip"] is None and reip_events(b, name) == []
        b.run("failover", name, "--stop-test")

        # Test failover with --re-ip: address, route and resolv.conf in the test VM.
        test = b.json("failover", name, "--test", "--re-ip")
        assert test["re_ip"] and test["test_vm"] == f"{name}-test"
        rec = wait_reip(b, name, AGENT_TIMEOUT + 120)
        assert rec["state"] == "done" and rec["vm"] == f"{name}-test", rec
        assert "10.77.0.5/24" in addresses(test_dom, MAC)
        code, routes, err = guest_exec(test_dom, "ip", "-4", "route", "show", "default")
        assert code == 0 and "default via 10.77.0.1" in routes, (routes, err)
        code, resolv, err = guest_exec(test_dom, "cat", "/etc/resolv.conf")
        assert code == 0 and resolv == RESOLV, (resolv, err)
        events = reip_events(b, name)
        assert len(events) == 1 and f"re-IP of {name}-test done" in events[0] \
            and "10.77.0.5/24 gw 10.77.0.1 dns 10.77.0.53" in events[0], events
        assert b.json("status", name)[0]["health"] == "normal"
        b.run("failover", name, "--stop-test")
        assert b.json("status", name)[0]["reip"] is None

        # A re-IP that cannot be done (the test VM on no network: no NIC in the guest):
        # a warning, and the test VM runs.
        b.json("failover", name, "--test", "--re-ip", "--network", "none")
        rec = wait_reip(b, name, AGENT_TIMEOUT + 120)
        assert rec["state"] == "failed" and f"no interface with MAC {MAC}" in rec["message"], rec
        st = b.json("status", name)[0]
        assert st["health"] == "warning" and any(
            f"re-IP of {name}-test failed: no interface with MAC {MAC}" in r
            for r in st["reasons"]), st
        assert f"re-IP of {name}-test failed" in b.run("status").stdout
        assert b.json("vm", "show", name)["warnings"], b.json("vm", "show", name)
        assert must(virsh("domstate", test_dom)).strip() == "running"
        assert f"re-IP of {name}-test failed" in reip_events(b, name)[-1]
        b.run("failover", name, "--stop-test")
        assert b.json("status", name)[0]["health"] == "normal"

        # --re-ip is for a test failover only (a failover re-IPs by itself): refused.
        out = b.run("failover", name, "--re-ip", check=False)
        assert out.returncode != 0 and "--re-ip is for a test failover" in out.stderr
        assert b.json("status", name)[0]["state"] == "replicating"

        # Unplanned failover: the failed-over VM gets its address; an event says so.
        t0 = time.monotonic()
        out = b.json("failover", name)
        command = time.monotonic() - t0
        assert out["planned"] is False and out["re_ip"], out
        rec = wait_reip(b, name, AGENT_TIMEOUT + 120)
        total = time.monotonic() - t0
        assert rec["state"] == "done" and rec["vm"] == name, rec
        assert "10.77.0.5/24" in addresses(replica_dom, MAC)
        code, resolv, _ = guest_exec(replica_dom, "cat", "/etc/resolv.conf")
        assert code == 0 and resolv == RESOLV
        assert f"re-IP of {name} done" in reip_events(b, name)[-1]
        b.run("failover", name, "--complete")
        st = b.json("status", name)[0]
        assert st["state"] == "failed_over" and st["health"] == "normal", st
        assert ipaddress.ip_interface("10.77.0.5/24") in {
            ipaddress.ip_interface(x) for x in addresses(replica_dom, MAC)}
        print(f"\n[re-ip] unplanned failover command {command:.1f} s; failover to the address "
              f"set and checked {total:.1f} s (the re-IP record: {rec['seconds']} s from the "
              f"VM's start)")
    except BaseException:
        print(f"[re-ip] console of {name}:\n{console_tail(console)}")
        raise
    finally:
        lab.teardown(a, b)
        virsh("destroy", name)
        virsh("undefine", name, "--checkpoints-metadata")
        for net in nets:
            virsh("net-destroy", net)
        shutil.rmtree(work, ignore_errors=True)
