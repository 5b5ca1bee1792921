"""An operator's existing libvirt domain, a real Debian system booting from its own disk
(a qcow2 overlay on a base image: a backing chain) with a NIC on a libvirt network and
the guest-agent channel, is protected as a whole VM:

- enabling it without a mapping for its network is refused with the flag to add; with
  the replica server's default map it is enabled, and its replica VM is defined from
  the primary's whole XML (CPU, machine, NIC with its MAC and model, the agent channel),
  its NIC on the mapped network;
- it is seeded and replicated while its SQLite bank runs, and its XML is unchanged but
  for checkpoints; its app-consistent points (qemu-guest-agent's fsfreeze) hold a root
  filesystem that `e2fsck -n` finds clean;
- a test failover puts the NIC on the isolated network; `--stop-test` leaves nothing
  behind (domain, network, files);
- after a power cut of the primary, an unplanned failover to the latest point boots the
  VM on the replica host from its own disk, on the mapped network with its own MAC; its
  bank passes `PRAGMA integrity_check`, the total is unchanged and the counter is at
  least what the primary had committed when the last cycle began;
- reverse makes the operator's domain the replica (kept as it is, only differences
  move); a planned failback brings it home with zero loss (the counter continues from
  the value read before the shutdown) and its XML exactly as defined, and sets the
  failover address set on its primary then (`set --failover-ip`) inside the guest, seen
  through the agent (re-IP after a planned failover); reverse again.

Host names of their own (deb-a, deb-b), random domain and network names: the system
libvirtd may be shared with another run.
"""

from __future__ import annotations

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
    assert_sound,
    bank_check,
    build,
    console_tail,
    domain_xml,
    fsck_root,
    must,
    virsh,
    wait_bank_above,
    wait_for_agent,
    wait_reip,
)
from harness.operator import inactive_xml, network, network_users

pytestmark = pytest.mark.e2e

NAMES = ("deb-a", "deb-b")
MAC = "52:54:00:5e:17:01"
FAILBACK_IP = f"{MAC}=10.78.0.7/24"


def iflist(dom: str) -> list[tuple[str, str, str]]:
    """(type, source, MAC) of each NIC in the domain's definition."""
    out = []
    for line in must(virsh("domiflist", dom, "--inactive")).splitlines():
        f = line.split()
        if len(f) >= 5:
            out.append((f[1], f[2], f[4]))
    return out


@pytest.mark.timeout(BUILD_TIMEOUT + 1200)
def test_existing_domain_fails_over_whole_on_its_mapped_network(request, fresh_dir):
    if os.geteuid() != 0:
        pytest.skip("building the Debian guest needs root")
    request.getfixturevalue("libvirtd")
    build()
    tag = secrets.token_hex(3)
    name = f"ops-{tag}"
    src_net, dst_net = f"vmrs-{tag}", f"vmrd-{tag}"
    work = Path(tempfile.mkdtemp(prefix="vmr-existfo-", dir="/tmp"))
    os.chmod(work, 0o755)
    base, disk, console = work / "base.qcow2", work / "root.qcow2", work / "console.log"
    shutil.copyfile(GUEST_CACHE / "disk.qcow2", base)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(disk)], check=True)
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    replica_dom = f"vmr-{NAMES[1]}-{name}"
    nets = []
    try:
        for net, br in ((src_net, f"vmrs{tag}"), (dst_net, f"vmrd{tag}")):
            network(net, br, work)
            nets.append(net)
        (work / "domain.xml").write_text(domain_xml(name, disk, console, src_net, MAC))
        must(virsh("define", str(work / "domain.xml")))
        before = inactive_xml(name)

        # No mapping for its network: refused at enable, with the flag to add.
        refused = a.run("enable", name, "--replica", b.address, check=False)
        assert refused.returncode != 0
        assert f"{MAC} on network {src_net}" in refused.stderr, refused.stderr
        assert f"--network-map {src_net}=DST" in refused.stderr, refused.stderr
        assert all(r["vm"] != name for r in a.json("status") + b.json("status"))
        # A mapping to a network the replica host lacks: refused, its networks listed.
        wrong = a.run("enable", name, "--replica", b.address, "--network-map",
                      f"{src_net}=nosuch-{tag}", check=False)
        assert wrong.returncode != 0 and f"no libvirt network or bridge named 'nosuch-{tag}'" \
            in wrong.stderr and dst_net in wrong.stderr, wrong.stderr

        # The replica server's default map; the replica VM is the whole VM.
        b.run("replica-server", "enable", "--network-map", f"{src_net}={dst_net}")
        assert b.json("replica-server", "show", "--json")["network_map"] == {src_net: dst_net}
        a.run("enable", name, "--replica", b.address, "--app-consistent-every", "1")
        assert iflist(replica_dom) == [("network", dst_net, MAC)]
        carried = inactive_xml(replica_dom)
        assert "org.qemu.guest_agent.0" in carried and "<model fallback='allow'>qemu64" in carried
        assert "machine='pc" in carried and "<memory unit='KiB'>524288</memory>" in carried

        # Seeded and replicated while the bank runs.
        must(virsh("start", name))
        wait_for_agent(name, AGENT_TIMEOUT)
        assert_sound(wait_bank_above(name, 0))
        assert a.json("initial", name, "--verify")["verified"]
        seen = bank_check(name)
        assert_sound(seen)
        stats = a.json("sync", name, "--verify")
        assert stats["verified"] and stats["raw_bytes"] > 0
        assert inactive_xml(name) == before            # checkpoints aside, untouched

        # App-consistent points: the guest agent froze the file systems; the point's root
        # filesystem is clean as it is (no journal to replay), by `e2fsck -n`.
        points = a.json("points", name)
        app = [p for p in points if p["kind"] == "app"]
        assert app, points
        fsck = fsck_root(Path(app[-1]["paths"]["vda"]), work)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        # (a crash-consistent one has a journal to replay: e2fsck -n skips it and says so)
        assert "journal recovery" not in fsck.stdout + fsck.stderr, fsck.stdout + fsck.stderr

        # Test failover: the NIC on the isolated network; nothing left after --stop-test.
        test = b.json("failover", name, "--test")
        test_dom = f"vmr-{NAMES[1]}-{test['test_vm']}"
        assert iflist(test_dom) == [("network", "vmreplica-isolated", MAC)]
        assert must(virsh("domstate", test_dom)).strip() == "running"
        overlays = list(b.home.rglob("test.qcow2"))
        assert overlays
        b.run("failover", name, "--stop-test")
        assert virsh("domstate", test_dom).returncode != 0
        # The isolated network goes with its last domain: kept only for another domain
        # on it (another test's, on this libvirtd), never for this one.
        users = network_users("vmreplica-isolated")
        assert test_dom not in users, users
        assert virsh("net-info", "vmreplica-isolated").returncode != 0 or users, \
            "the isolated network outlived the test failover, and no domain is on it"
        if users:
            print(f"\n[existing failover] the isolated network is kept for {users}")
        assert all(not p.exists() for p in overlays)

        # A power cut of the primary after a last cycle; unplanned failover.
        committed = bank_check(name)["counter"]         # before the cycle's freeze
        assert a.json("sync", name)["cycle"] > stats["cycle"]
        must(virsh("destroy", name))
        t0 = time.monotonic()
        out = b.json("failover", name)
        assert out["planned"] is False
        assert iflist(replica_dom) == [("network", dst_net, MAC)]
        boot = wait_for_agent(replica_dom, AGENT_TIMEOUT)
        after = bank_check(replica_dom)
        assert_sound(after)
        assert after["counter"] >= committed, (committed, after)
        print(f"\n[existing failover] failover to guest-ping {time.monotonic() - t0:.1f} s "
              f"(boot {boot:.1f} s); bank {committed} committed -> {after['counter']} on "
              f"{NAMES[1]}")
        b.run("failover", name, "--complete")
        assert b.json("status", name)[0]["state"] == "failed_over"
        assert inactive_xml(name) == before

        # Reverse: the operator's domain on deb-a becomes the replica, kept as it is (only
        # the differences move); its XML is not touched.
        back = b.json("reverse", name)
        assert back["primary"] == NAMES[1] and back["bytes_moved"] < back["disk_bytes"] // 4
        assert inactive_xml(name) == before
        running = wait_bank_above(replica_dom, after["counter"])
        assert_sound(running)
        assert b.json("sync", name, "--verify")["verified"]

        # Planned failback: zero loss, the domain at home exactly as it was defined, and
        # the failover address the operator set on deb-b (its primary now) set inside the
        # guest once its agent answers (re-IP after a planned failover).
        b.run("set", name, "--failover-ip", FAILBACK_IP)
        last = bank_check(replica_dom)["counter"]
        b.run("failover", name, "--prepare", "--shutdown")
        home = a.json("failover", name)
        assert home["planned"] is True and home["state"] == "failed_over", home
        assert home["re_ip"], home
        wait_for_agent(name, AGENT_TIMEOUT)
        at_home = bank_check(name)
        assert_sound(at_home)
        assert at_home["counter"] >= last, (last, at_home)
        rec = wait_reip(a, name, AGENT_TIMEOUT + 120)
        assert rec["state"] == "done" and rec["vm"] == name, rec
        assert "10.78.0.7/24" in addresses(name, MAC)
        assert any(e["kind"] == "re-ip" and f"re-IP of {name} done" in e["message"]
                   for e in a.json("events", name))
        assert inactive_xml(name) == before             # (re-IP changes the guest, not XML)
        again = a.json("reverse", name)                 # deb-b its replica again
        assert again["bytes_moved"] < again["disk_bytes"] // 4
        assert a.json("status", name)[0]["role"] == "primary"
        assert a.json("sync", name, "--verify")["verified"]
        print(f"[existing failover] reverse moved {back['bytes_moved']} B, failback merged "
              f"{home.get('merged_bytes')} B, reverse home moved {again['bytes_moved']} B; "
              f"bank {last} on {NAMES[1]} at shutdown -> {at_home['counter']} at home")
        assert inactive_xml(name) == before
    except BaseException:
        print(f"[existing failover] console of {name}:\n{console_tail(console)}")
        raise
    finally:
        lab.teardown(a, b)
        virsh("destroy", name)
        virsh("undefine", name, "--checkpoints-metadata")
        for net in nets:
            virsh("net-destroy", net)
        shutil.rmtree(work, ignore_errors=True)
