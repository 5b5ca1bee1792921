"""Issue 19, test 5: the replica's definition follows the primary's configuration. An
operator's libvirt domain (stopped: its disks are written by qemu-io) is replicated;
then, on the primary, the operator grows a disk (`qemu-img resize`), changes the memory
and the vCPUs, adds a disk and a NIC, removes a disk and adds a NIC on a network the
replica has no mapping for. After one `sync` each time the replica VM's definition
(`virsh dumpxml --inactive vmr-cfg-b-NAME`) shows the change and an event says what
changed; the grown disk moves only what was written (its bitmap spans the resize), the
new disk is seeded by a resync that moves its data and the others' changes only; a
removed disk's replica storage is gone; a NIC without a mapping is reported and follows
once mapped. The primary's XML stays as the operator made it (vmreplica adds only
checkpoints, which are not in it).

Host names cfg-a/cfg-b, random domain and network names: another run may share the
system libvirtd.
"""

from __future__ import annotations

import secrets
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import lab
from harness.operator import inactive_xml, network, virsh
from helpers import assert_replica_equals, qemu_io

pytestmark = pytest.mark.e2e

NAMES = ("cfg-a", "cfg-b")
MAC1, MAC2, MAC3 = "52:54:00:c0:f1:01", "52:54:00:c0:f1:02", "52:54:00:c0:f1:03"
K64 = 64 << 10


def shape(name: str) -> dict:
    """What the test reads of a definition: memory (MiB), vCPUs, disks (target: source)
    and NICs (MAC: network)."""
    root = ET.fromstring(inactive_xml(name))
    mem = root.find("memory")
    assert mem is not None and mem.text and mem.get("unit", "KiB") == "KiB"
    disks = {}
    for d in root.findall("devices/disk"):
        t, s = d.find("target"), d.find("source")
        if t is not None and d.get("device", "disk") == "disk":
            disks[t.get("dev")] = s.get("file") if s is not None else None
    nics = {}
    for n in root.findall("devices/interface"):
        m, s = n.find("mac"), n.find("source")
        nics[m.get("address") if m is not None else None] = \
            s.get("network") if s is not None else None
    return {"memory": int(mem.text) // 1024, "vcpus": int(root.findtext("vcpu") or 0),
            "disks": disks, "nics": nics}


def config_events(host: lab.LabHost, vm: str) -> list[str]:
    return [e["message"] for e in host.json("events", vm) if e["kind"] == "config"]


def new_events(host: lab.LabHost, vm: str, seen: list[str]) -> str:
    now = config_events(host, vm)
    fresh = now[len(seen):]
    seen[:] = now
    return " | ".join(fresh)


def domain_xml(name: str, disks: list[tuple[Path, str]], net: str) -> str:
    devs = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                   f"<source file='{p}'/><target dev='{t}' bus='virtio'/></disk>"
                   for p, t in disks)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <devices>{devs}
    <interface type='network'><mac address='{MAC1}'/><source network='{net}'/>
      <model type='virtio'/></interface>
    <memballoon model='none'/></devices>
</domain>"""


def qcow2(path: Path, size: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)


def same(a: str, b: str) -> None:
    proc = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(900)
def test_replica_definition_follows_the_primary(fresh_dir, libvirtd, workdir):
    tag = secrets.token_hex(3)
    name = f"ops-{tag}"
    src, dst, other = f"vmrcs-{tag}", f"vmrcd-{tag}", f"vmrco-{tag}"
    replica_dom = f"vmr-{NAMES[1]}-{name}"
    vda, vdb, vdc = workdir / "vda.qcow2", workdir / "vdb.qcow2", workdir / "vdc.qcow2"
    qcow2(vda, "64M")
    qcow2(vdb, "32M")
    qemu_io(vda, "write -P 0x11 0 2M")
    qemu_io(vdb, "write -P 0x22 1M 1M")
    a, b = lab.two_sites(fresh_dir, driver="libvirt", names=NAMES)
    nets = []
    try:
        for net, br in ((src, f"vmrcs{tag}"), (dst, f"vmrcd{tag}"), (other, f"vmrco{tag}")):
            network(net, br, workdir)
            nets.append(net)
        (workdir / "domain.xml").write_text(domain_xml(name, [(vda, "vda"), (vdb, "vdb")], src))
        virsh("define", str(workdir / "domain.xml"))
        b.run("replica-server", "enable", "--network-map", f"{src}={dst}")
        a.run("enable", name, "--replica", b.address)
        assert a.json("initial", name, "--verify")["verified"]
        assert shape(replica_dom) == {"memory": 256, "vcpus": 1,
                                      "disks": {"vda": b.vm(name)["disks"][0]["path"],
                                                "vdb": b.vm(name)["disks"][1]["path"]},
                                      "nics": {MAC1: dst}}
        seen: list[str] = []
        new_events(a, name, seen)
        seen_b: list[str] = []
        new_events(b, name, seen_b)
        figures = {}

        # 1. A disk grown, written in its new area; memory and vCPUs changed. A delta
        # cycle: the bitmap spans the resize, so only what was written moves.
        subprocess.run(["qemu-img", "resize", "-q", str(vda), "96M"], check=True)
        qemu_io(vda, "write -P 0x33 80M 64k")
        qemu_io(vdb, "write -P 0x44 4M 64k")
        virsh("setmaxmem", name, "384M", "--config")
        virsh("setmem", name, "384M", "--config")
        virsh("setvcpus", name, "2", "--config", "--maximum")
        virsh("setvcpus", name, "2", "--config")
        operator = inactive_xml(name)
        stats = a.json("sync", name, "--verify")
        assert stats["mode"] == "delta" and stats["verified"], stats
        assert stats["raw_bytes"] == 2 * K64, stats        # the new area's write + vdb's
        figures["grown + memory + vCPUs (delta cycle)"] = stats["raw_bytes"]
        assert "disk vda grown 64.0 MiB → 96.0 MiB" in stats["config"]["changes"], stats
        got = shape(replica_dom)
        assert (got["memory"], got["vcpus"]) == (384, 2), got
        vda_head = b.vm(name)["disks"][0]["path"]
        assert b.vm(name)["disks"][0]["virtual_size"] == 96 << 20
        same(str(vda), vda_head)
        text = new_events(a, name, seen)
        for words in ("disk vda grown 64.0 MiB → 96.0 MiB", "memory 256 MiB → 384 MiB",
                      "vCPUs 1 → 2"):
            assert words in text, text
        assert "memory 256 MiB → 384 MiB" in new_events(b, name, seen_b)
        assert inactive_xml(name) == operator            # the primary's XML: the operator's

        # 2. A disk added (data on it) and a NIC on the mapped network; a change on vda.
        # The new disk is seeded by a resync: its data and vda's change move, nothing more.
        qcow2(vdc, "16M")
        qemu_io(vdc, "write -P 0x55 0 2M", "write -P 0x56 10M 1M")
        qemu_io(vda, "write -P 0x66 8M 64k")
        virsh("attach-disk", name, str(vdc), "vdc", "--config", "--driver", "qemu",
              "--subdriver", "qcow2", "--targetbus", "virtio")
        virsh("attach-interface", name, "network", src, "--mac", MAC2, "--model", "virtio",
              "--config")
        operator = inactive_xml(name)
        stats = a.json("sync", name)
        assert stats["mode"] == "resync", stats
        assert stats["bytes_moved"] == (3 << 20) + K64, stats
        figures["disk added + NIC (resync)"] = stats["bytes_moved"]
        got = shape(replica_dom)
        assert set(got["disks"]) == {"vda", "vdb", "vdc"} and got["nics"] == {MAC1: dst,
                                                                              MAC2: dst}, got
        assert [d["name"] for d in b.vm(name)["disks"]] == ["vda", "vdb", "vdc"]
        text = new_events(a, name, seen)
        assert "disk vdc added" in text and f"NIC {MAC2} added" in text, text
        assert "seeded by a resync" in text, text
        status = a.json("status", name)[0]
        assert status["state"] == "replicating", status
        assert_replica_equals(a, b, name)
        assert inactive_xml(name) == operator
        # ... and the next cycles are deltas over the three disks.
        qemu_io(vdc, "write -P 0x57 12M 64k")
        stats = a.json("sync", name, "--verify")
        assert stats["mode"] == "delta" and stats["raw_bytes"] == K64 and stats["verified"]
        assert "config" not in stats
        figures["after the seed (delta cycle)"] = stats["raw_bytes"]

        # 3. A disk removed: gone from the relationship and the replica, its chain deleted.
        vdb_dir = Path(b.vm(name)["disks"][1]["path"]).parent
        assert vdb_dir.name == "vdb" and vdb_dir.exists()
        virsh("detach-disk", name, "vdb", "--config")
        operator = inactive_xml(name)
        stats = a.json("sync", name, "--verify")
        assert stats["mode"] == "delta" and stats["verified"], stats
        assert "disk vdb removed" in stats["config"]["changes"], stats
        assert set(shape(replica_dom)["disks"]) == {"vda", "vdc"}
        assert [d["name"] for d in b.vm(name)["disks"]] == ["vda", "vdc"]
        assert not vdb_dir.exists()
        assert "vmreplica-" not in subprocess.run(["qemu-img", "info", "-U", str(vdb)],
                                                  capture_output=True, text=True).stdout
        assert "disk vdb removed" in new_events(a, name, seen)
        assert_replica_equals(a, b, name)
        assert inactive_xml(name) == operator

        # 4. A NIC on a network the replica has no mapping for: reported (once), the
        # replica VM keeps its definition, replication goes on; mapped, it follows.
        virsh("attach-interface", name, "network", other, "--mac", MAC3, "--config")
        for _ in range(2):
            qemu_io(vda, "write -P 0x77 9M 64k")
            stats = a.json("sync", name)
            assert stats["raw_bytes"] == K64, stats
        assert MAC3 not in shape(replica_dom)["nics"]
        text = new_events(a, name, seen)
        assert text.count("cannot follow") == 1, text
        assert f"{MAC3} on network {other}" in text and f"--network-map {other}=DST" in text
        assert "cannot follow" in new_events(b, name, seen_b)
        b.run("replica-server", "enable", "--network-map", f"{other}={dst}")
        out = a.run("sync", name).stdout
        assert f"the replica follows: NIC {MAC3} added (network {dst}" in out, out
        assert shape(replica_dom)["nics"] == {MAC1: dst, MAC2: dst, MAC3: dst}
        assert f"NIC {MAC3} added" in new_events(a, name, seen)
        print(f"[config follows] bytes moved: {figures}")
        print("[config follows] events on cfg-a:\n  " + "\n  ".join(config_events(a, name)))
        print("[config follows] events on cfg-b:\n  " + "\n  ".join(config_events(b, name)))

        a.run("remove", name)
        assert virsh("checkpoint-list", name, "--name").stdout.split() == []
        for disk in (vda, vdb, vdc):         # (vdb's went when it left the domain)
            out = subprocess.run(["qemu-img", "info", "-U", str(disk)], capture_output=True,
                                 text=True, check=True).stdout
            assert "bitmaps:" not in out, out
    finally:
        lab.teardown(a, b)
        virsh("undefine", name, "--checkpoints-metadata", check=False)
        for net in nets:
            virsh("net-destroy", net, check=False)
