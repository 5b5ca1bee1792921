"""The libvirt driver against a real libvirtd (started by scripts/start-libvirtd.sh) with real
domains running the demo guest: inventory and naming of two hosts sharing one libvirtd,
power, guest agent, and change tracking through checkpoints + pull-mode backup (running)
and a qemu-storage-daemon (shut off), consumed by the real BitmapTracker.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from harness import lab
from vmreplica.errors import Conflict, HypervisorError, NotFound, Unsupported

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
PREFIX = "vmreplica-lvtest00-"


@pytest.fixture(scope="module")
def libvirtd():
    try:
        import libvirt  # noqa: F401
    except ImportError as e:
        pytest.skip(f"libvirt-python is not importable: {e}")
    p = subprocess.run(["bash", str(REPO / "scripts" / "start-libvirtd.sh")],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        pytest.skip(f"libvirtd cannot start here: {(p.stderr or p.stdout).strip()}")
    import libvirt
    lab.sweep_stale_domains()      # of runs killed before their teardown
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def root():
    # QEMU runs as libvirt-qemu: every folder above a disk must be traversable (0755).
    d = Path(tempfile.mkdtemp(prefix="vmrlv-", dir="/tmp"))
    os.chmod(d, 0o755)
    lab.claim_root(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _home(root: Path, sub: str, name: str | None = None) -> Path:
    h = root / sub
    h.mkdir()
    os.chmod(h, 0o755)
    if name:   # the host name as a real home keeps it: settings 'name', JSON-encoded
        con = sqlite3.connect(h / "state.db")
        con.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.execute("INSERT INTO settings VALUES ('name', ?)", (json.dumps(name),))
        con.commit()
        con.close()
    return h


@pytest.fixture
def hosts(libvirtd, root):
    """Two hosts on the one libvirtd: A names itself in config, B in its state.db."""
    from vmreplica.hypervisor.factory import get_driver
    tag = secrets.token_hex(3)
    ha, hb = f"lvt{tag}-a", f"lvt{tag}-b"
    a = get_driver("libvirt", _home(root, f"{tag}-a"),
                   {"libvirt_uri": "qemu:///system", "accel": "tcg", "host_name": ha})
    b = get_driver("libvirt", _home(root, f"{tag}-b", hb),
                   {"libvirt_uri": "qemu:///system", "accel": "auto"})
    yield a, b
    for drv in (a, b):
        for vm in _ours(drv):
            try:
                drv.stop(vm.name, force=True)
                drv.delete(vm.name)
            except Exception:  # noqa: BLE001 — best-effort cleanup
                pass


def _ours(drv):
    """The VMs vmreplica made of a driver's host (the system libvirtd may hold other
    runs' or operators' existing domains, which list_vms shows too)."""
    return [v for v in drv.list_vms() if v.origin == "vmreplica"]


def _qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [str(path)], capture_output=True, text=True)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr


def _image_bitmaps(path) -> set[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    return {b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])}


def _wait_console(path: Path, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def _top_record(point, disk: str) -> int:
    """The demo guest's newest record number in the frozen view (it mirrors it to sector 0)."""
    from vmreplica.hypervisor.guest import parse_record
    seq = parse_record(bytes(point.handles[disk].pread(512, 0)))
    assert seq is not None
    return seq


def _covered(plan, offset: int, length: int = 512) -> bool:
    return any(off <= offset and offset + length <= off + ln for _, off, ln in plan)


def _assert_records_dirty(point, disk: str, first: int, last: int) -> None:
    plan = point.plan[disk]
    assert last >= first, (first, last)
    missing = [n for n in range(first, last + 1) if not _covered(plan, n * 512)]
    assert not missing, f"records {missing[:5]}... of {first}..{last} not dirty in {plan}"
    assert _covered(plan, 0), plan


CLUSTER_SECTORS = 128   # bitmap granularity 64 KiB = 128 records
SEED = 1000             # the guest's first record: away from cluster 0, 24 before a boundary


def _seed_records(path: Path, seq: int) -> None:
    """Make the demo guest continue from ``seq`` + 1 (it resumes after sector 0's record)."""
    from vmreplica.hypervisor.guest import RECORD
    rec = path.parent / "seed.rec"
    rec.write_bytes((RECORD + str(seq).encode()).ljust(512, b"\0"))
    _qemu_io(path, f"write -s {rec} 0 512")
    rec.unlink()


def _wait_records(drv, vm: str, past: int, timeout: float = 30) -> None:
    """Wait until the guest has written beyond record ``past`` (read from the live image)."""
    from vmreplica.hypervisor.guest import read_demo_records
    path = drv.inspect(vm).disks[-1].path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        top = read_demo_records(path, limit_sectors=1)["top"]
        if top is not None and top > past + 5:
            return
        time.sleep(0.2)
    raise AssertionError(f"the guest wrote nothing past record {past}")


# ----------------------------------------------------------------------------------------

def test_inventory_two_hosts_one_libvirtd(hosts, root, libvirtd):
    import libvirt
    a, b = hosts
    info = a.create_vm("vm1", [8 * MiB, 4 * MiB], memory_mb=192, guest="demo")
    assert info.state == "stopped" and info.agent and info.guest == "demo"
    assert [d.name for d in info.disks] == ["disk0", "disk1"]
    assert all(Path(d.path).parent == a.home / "vms" / "vm1" for d in info.disks)
    with pytest.raises(Conflict):
        a.create_vm("vm1", [MiB])
    with pytest.raises(NotFound, match="no VM named nope on this host"):
        a.inspect("nope")

    # The replica: same vmreplica name and identity uuid, on another host of this libvirtd.
    desc = a.describe("vm1")
    assert desc == {"name": "vm1", "uuid": info.uuid, "memory_mb": 192, "guest": "demo",
                    "agent": True, "network": "none",
                    "disks": [{"name": "disk0", "format": "qcow2", "virtual_size": 8 * MiB},
                              {"name": "disk1", "format": "qcow2", "virtual_size": 4 * MiB}]}
    store = root / f"{b.host_name}-storage"
    store.mkdir()
    os.chmod(store, 0o755)
    disks = []
    for d in desc["disks"]:
        p = store / f"{d['name']}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), str(d["virtual_size"])],
                       check=True)
        disks.append(dict(d, path=str(p)))
    rinfo = b.define_vm(dict(desc, disks=disks, owns=[str(store)], network="isolated"))
    assert rinfo.uuid == info.uuid and rinfo.name == "vm1"
    b.set_title("vm1", f"replica of vm1 on {a.host_name}", "a replica")
    assert b.title("vm1") == (f"replica of vm1 on {a.host_name}", "a replica")

    da = libvirtd.lookupByName(f"vmr-{a.host_name}-vm1")
    db = libvirtd.lookupByName(f"vmr-{b.host_name}-vm1")
    assert da.UUIDString() == str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{a.host_name}/{info.uuid}"))
    assert db.UUIDString() == str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{b.host_name}/{info.uuid}"))
    assert da.UUIDString() != db.UUIDString()
    assert not da.autostart() and not db.autostart()
    assert "replica of vm1 on" in db.metadata(libvirt.VIR_DOMAIN_METADATA_TITLE, None)
    meta = db.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://vmreplica.example/ns/1")
    assert info.uuid in meta and b.host_name in meta and str(store) in meta
    # Each host lists only its own VM.
    assert [(v.name, v.disks[0].path) for v in _ours(a)] == [("vm1", info.disks[0].path)]
    assert [(v.name, v.disks[0].path) for v in _ours(b)] == [("vm1", disks[0]["path"])]
    assert b.describe("vm1")["network"] == "isolated"

    # The isolated NIC: a bridge without address or forward; the domain starts on it.
    b.start("vm1")
    try:
        assert b.inspect("vm1").state == "running" and a.inspect("vm1").state == "stopped"
        xml = db.XMLDesc(0)
        assert "<interface type='network'>" in xml and "vmreplica-isolated" in xml
        with pytest.raises(Conflict):
            b.set_disks("vm1", {"disk0": disks[0]["path"]})
        with pytest.raises(Conflict):
            b.delete("vm1")
    finally:
        b.stop("vm1", force=True)
    assert b.inspect("vm1").state == "stopped" and b.inspect("vm1").pid is None

    # set_disks / add_owned on a stopped VM
    other = store / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(8 * MiB)], check=True)
    b.set_disks("vm1", {"disk0": str(other)})
    assert b.inspect("vm1").disks[0].path == str(other)
    assert f"<source file='{other}'/>" in db.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    extra = root / f"{b.host_name}-extra"
    extra.write_text("x")
    b.add_owned("vm1", [str(extra)])

    b.delete("vm1")
    assert not store.exists() and not extra.exists()
    assert _ours(b) == [] and [v.name for v in _ours(a)] == ["vm1"]
    with pytest.raises(libvirt.libvirtError):
        libvirtd.lookupByName(f"vmr-{b.host_name}-vm1")

    # A VM without a guest agent: ACPI first (nothing answers it), powered off after timeout.
    # The VM checker's view (libvirt's state and reason; no agent: None, not an error).
    a.create_vm("blank", [MiB])
    with pytest.raises(Unsupported, match="qemu driver"):
        a.create_vm("shared", [MiB], share_rw=True)
    assert a.check("blank") == {"process": False, "qmp": None, "agent": None,
                                "uptime": None, "state": "shut off (unknown)"}
    a.start("blank")
    chk = a.check("blank")
    assert chk["process"] and chk["qmp"] == "running" and chk["agent"] is None, chk
    assert chk["state"] == "running (booted)" and 0 <= chk["uptime"] < 60, chk
    a.pause("blank")
    assert (a.check("blank")["qmp"], a.check("blank")["state"]) == ("paused", "paused (user)")
    a.resume("blank")
    assert a.check("blank")["state"] == "running (unpaused)"
    with pytest.raises(Unsupported, match="`vm io` needs the qemu driver"):
        a.io("blank", "disk0", "read 0 512")
    assert a.saved_state("blank") is None
    t0 = time.monotonic()
    a.stop("blank", timeout=1.5)
    assert a.inspect("blank").state == "stopped" and time.monotonic() - t0 < 15
    assert a.check("blank")["state"] == "shut off (destroyed)"
    a.delete("blank")

    # A disk QEMU (libvirt-qemu) cannot reach: a clear error before libvirt's own.
    hidden = Path(tempfile.mkdtemp(prefix="hidden-", dir=root))   # mode 0700
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(hidden / "d.qcow2"), "1M"],
                   check=True)
    a.define_vm({"name": "hidden", "disks": [{"name": "disk0", "path": str(hidden / "d.qcow2"),
                                              "format": "qcow2", "virtual_size": MiB}]})
    with pytest.raises(HypervisorError, match=f"cannot enter {hidden}"):
        a.start("hidden")
    a.delete("hidden")
    assert (hidden / "d.qcow2").exists()   # not the VM's: left alone

    a.delete("vm1")
    assert _ours(a) == [] and not (a.home / "vms" / "vm1").exists()


def test_raw_disk_holds_no_bitmap_and_is_scan_tracked(hosts):
    """A raw disk cannot hold a persistent bitmap: it is tracked by the hash scan (the
    driver says so), no checkpoint covers it, and a freeze with ``since`` exports it
    whole, without a dirty-bitmap context (the cycle compares its blocks instead)."""
    a, _ = hosts
    a.create_vm("raw1", [4 * MiB], disk_format="raw")
    assert a.disk_tracking("raw1") == {"disk0": "scan"}
    with a.block_session("raw1") as s:
        assert not s.running
        e = s.freeze(["disk0"], None, PREFIX + "1")   # a full view works; no checkpoint
        assert e["disk0"].bitmap_context is None and e["disk0"].name == "vda"
        s.unexport()
        assert s.bitmaps("disk0") == []
        e = s.freeze(["disk0"], PREFIX + "1", PREFIX + "2")
        assert e["disk0"].bitmap_context is None and e["disk0"].size == 4 * MiB
        s.unexport()
    assert a.checkpoints("raw1") == []
    a.delete("raw1")


def test_change_tracking_running_and_shut_off(hosts, libvirtd):
    """BitmapTracker over the libvirt session: full point, deltas that cover every record
    the guest wrote, a failed cycle restored without loss, leftovers merged both ways,
    the same while shut off (qemu-storage-daemon), and back to libvirt after a restart."""
    from vmreplica.tracking.bitmap import BitmapTracker
    a, _ = hosts
    tr = BitmapTracker()
    disks = ["disk0", "disk1"]
    n = [f"{PREFIX}{i}" for i in range(12)]
    info = a.create_vm("trk", [16 * MiB, 8 * MiB], guest="demo")
    dom_name = a.domain_of("trk")
    console = a.home / "vms" / "trk" / "console.log"
    _seed_records(Path(info.disks[1].path), SEED)
    a.start("trk")
    _wait_console(console, f"writer on /dev/vdb from seq={SEED + 1}")
    vi = a.inspect("trk")
    assert vi.state == "running" and vi.pid and dom_name.encode() in Path(
        f"/proc/{vi.pid}/cmdline").read_bytes()

    # guest agent
    a.freeze_filesystems("trk")
    assert a.agent_command("trk", "guest-fsfreeze-status") == "frozen"
    a.thaw_filesystems("trk")
    assert a.agent_command("trk", "guest-fsfreeze-status") == "thawed"
    assert a.check("trk")["agent"] == "ok"
    with pytest.raises(HypervisorError, match="guest-nonesuch"):
        a.agent_command("trk", "guest-nonesuch")

    # 1: initial point — everything allocated, checkpoint n1 starts
    with a.block_session("trk") as s:
        assert s.running
        p = tr.point(s, disks, None, n[1])
        assert p.exports["disk1"].name == "vdb" and p.exports["disk1"].bitmap_context is None
        assert _covered(p.plan["disk1"], 0)
        t1 = _top_record(p, "disk1")
        got = sum(c.length for c in p.chunks())
        assert got == p.data_bytes() > 0
        p.close()
        p.commit()
        assert [(b.name, b.recording, b.inconsistent) for b in s.bitmaps("disk1")] == \
            [(n[1], True, False)]
    # Sector 0 (cluster 0) is rewritten with every record: let the failed cycle's records
    # end in a cluster that nothing after the restore touches again.
    _wait_records(a, "trk", max(t1, (t1 // CLUSTER_SECTORS + 1) * CLUSTER_SECTORS))

    # 2: a delta that fails: restore keeps everything since n1
    with a.block_session("trk") as s:
        tr.prepare(s, disks, n[1], PREFIX)
        p = tr.point(s, disks, n[1], n[2])
        assert p.exports["disk1"].bitmap_context == "qemu:dirty-bitmap:backup-vdb"
        t2 = _top_record(p, "disk1")
        _assert_records_dirty(p, "disk1", t1 + 1, t2)
        assert p.plan["disk0"] == []      # the guest never writes its first disk
        assert {b.name for b in s.bitmaps("disk1")} == {n[1], n[2]}
        p.close()
        p.abort()
        assert a.checkpoints("trk") == [n[1]]
    _wait_records(a, "trk", t2)

    # 3: the next cycle from n1 sees the failed cycle's records and the new ones
    with a.block_session("trk") as s:
        tr.prepare(s, disks, n[1], PREFIX)
        p = tr.point(s, disks, n[1], n[3])
        t3 = _top_record(p, "disk1")
        assert t3 > t2
        # the check below is meaningful: records t1+1.. sit in a cluster of their own,
        # written only between the first freeze and the failed one
        assert 0 < (t1 + 1) // CLUSTER_SECTORS < t3 // CLUSTER_SECTORS, (t1, t2, t3)
        _assert_records_dirty(p, "disk1", t1 + 1, t3)
        p.close()
        p.commit()
        assert a.checkpoints("trk") == [n[3]]
    _wait_records(a, "trk", t3)

    # 4: a crash after freeze (neither commit nor abort): newer leftover n4 is merged away
    with a.block_session("trk") as s:
        p = tr.point(s, disks, n[3], n[4])
        p.close()
    assert a.checkpoints("trk") == [n[3], n[4]]
    _wait_records(a, "trk", t3)
    with a.block_session("trk") as s:
        tr.prepare(s, disks, n[3], PREFIX)
        assert a.checkpoints("trk") == [n[3]]
        p = tr.point(s, disks, n[3], n[5])
        t5 = _top_record(p, "disk1")
        _assert_records_dirty(p, "disk1", t3 + 1, t5)
        p.close()
        p.commit()
    # 6: a crash between recording the new point and releasing the old: older leftover
    with a.block_session("trk") as s:
        p = tr.point(s, disks, n[5], n[6])
        t6 = _top_record(p, "disk1")
        p.close()
    assert a.checkpoints("trk") == [n[5], n[6]]
    with a.block_session("trk") as s:
        tr.prepare(s, disks, n[6], PREFIX)
    assert a.checkpoints("trk") == [n[6]]

    with pytest.raises(Conflict):
        a.delete("trk")
    t0 = time.monotonic()
    a.stop("trk")                              # guest agent: the writer stops, then poweroff
    assert a.inspect("trk").state == "stopped" and time.monotonic() - t0 < 30
    assert "poweroff" in console.read_text(errors="replace")
    d0, d1 = (Path(d.path) for d in a.inspect("trk").disks)
    assert _image_bitmaps(d1) == {n[6]} and _image_bitmaps(d0) == {n[6]}

    # shut off: written with qemu-io, tracked by the persistent bitmaps
    _qemu_io(d1, "write -P 0x5a 6M 64k")
    _qemu_io(d0, "write -P 0x33 1M 4k")
    with a.block_session("trk") as s:
        assert not s.running
        assert [(b.name, b.recording, b.inconsistent) for b in s.bitmaps("disk1")] == \
            [(n[6], True, False)]
        tr.prepare(s, disks, n[6], PREFIX)
        p = tr.point(s, disks, n[6], n[7])     # fails: restored, nothing lost
        assert a.checkpoints("trk") == [n[6], n[7]]
        p.close()
        p.abort()
        assert a.checkpoints("trk") == [n[6]]
        p = tr.point(s, disks, n[6], n[8])
        assert p.exports["disk1"].bitmap_context == "qemu:dirty-bitmap:backup-vdb"
        t8 = _top_record(p, "disk1")         # the records written before the shutdown
        assert t8 >= t6
        if t8 > t6:
            _assert_records_dirty(p, "disk1", t6 + 1, t8)
        assert _covered(p.plan["disk1"], 6 * MiB, 64 << 10)
        assert _covered(p.plan["disk0"], 1 * MiB, 4096)
        data = {c.offset: bytes(c.data) for c in p.chunks() if c.disk == "disk1" and c.data}
        assert any(off <= 6 * MiB < off + len(v) and v[6 * MiB - off] == 0x5a
                   for off, v in data.items())
        p.close()
        p.commit()
        assert a.checkpoints("trk") == [n[8]]
    assert _image_bitmaps(d1) == {n[8]} and _image_bitmaps(d0) == {n[8]}

    # running again: libvirt backs up from the checkpoint recorded while it was off
    a.start("trk")
    _wait_console(console, f"writer on /dev/vdb from seq={t8 + 1}")
    _wait_records(a, "trk", t8)
    with a.block_session("trk") as s:
        assert s.running
        tr.prepare(s, disks, n[8], PREFIX)
        p = tr.point(s, disks, n[8], n[9])
        t9 = _top_record(p, "disk1")
        _assert_records_dirty(p, "disk1", t8 + 1, t9)
        assert not _covered(p.plan["disk1"], 6 * MiB, 64 << 10)   # shipped while off
        p.close()
        p.commit()
    assert a.checkpoints("trk") == [n[9]]

    a.stop("trk", force=True)
    a.delete("trk")
    import libvirt
    with pytest.raises(libvirt.libvirtError):
        libvirtd.lookupByName(dom_name)
    assert not (a.home / "vms" / "trk").exists()
    assert not Path(f"/var/lib/libvirt/qemu/checkpoint/{dom_name}").exists()
    assert not Path(f"/var/log/libvirt/qemu/{dom_name}.log").exists()
    assert not list(a.run_dir.glob("lv-*"))   # the storage daemon's sockets are gone
    assert info.uuid not in json.dumps([v.uuid for v in _ours(a)])


def test_a_killed_runs_domains_are_swept_and_a_live_runs_are_kept(libvirtd, root):
    """A test run killed before its teardown leaves its domains defined (CI met them as
    'libvirt already has a domain named ...'): the next run removes the domains of lab
    roots whose owner process is gone, and never those of a live root."""
    from vmreplica.hypervisor.factory import get_driver
    tag = secrets.token_hex(3)
    name = f"lvt{tag}-sweep"
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = Path(tempfile.mkdtemp(prefix="vmr-killed-", dir="/tmp"))
    os.chmod(killed, 0o755)
    (killed / lab.OWNER_FILE).write_text(f"{dead.pid} {lab.process_start_time(os.getpid())}\n")
    try:
        old = get_driver("libvirt", _home(killed, "a"),
                         {"libvirt_uri": "qemu:///system", "accel": "tcg", "host_name": name})
        old.create_vm("vm1", [MiB])
        live = get_driver("libvirt", _home(root, f"{tag}-live"),
                          {"libvirt_uri": "qemu:///system", "accel": "tcg",
                           "host_name": f"{name}-live"})
        live.create_vm("vm1", [MiB])
        assert not lab.root_is_stale(root)

        again = get_driver("libvirt", _home(root, f"{tag}-again"),
                           {"libvirt_uri": "qemu:///system", "accel": "tcg", "host_name": name})
        with pytest.raises(Conflict, match=f"libvirt already has a domain named vmr-{name}-vm1"):
            again.create_vm("vm1", [MiB])

        assert lab.sweep_stale_domains() == [f"vmr-{name}-vm1"]
        assert [v.name for v in _ours(live)] == ["vm1"]
        again.create_vm("vm1", [MiB])       # the name is free again
        assert [v.name for v in _ours(again)] == ["vm1"]
        assert lab.sweep_stale_domains() == []
    finally:
        for home in (killed / "a", root / f"{tag}-live", root / f"{tag}-again"):
            lab._undefine_domains(home)
        shutil.rmtree(killed, ignore_errors=True)
