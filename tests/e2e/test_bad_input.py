"""Bad input gets one clear line naming the problem and the fix, a non-zero exit, and
changes nothing — on either host."""

from __future__ import annotations

import pytest

from harness import lab
from helpers import fails

pytestmark = pytest.mark.e2e


_fails = fails


def _nothing_replicated(a, b, vm):
    assert a.json("status") == [] or all(r["vm"] != vm for r in a.json("status"))
    assert all(v["name"] != vm for v in b.json("vm", "list"))


def test_unknown_vm(sites):
    a, b = sites
    _fails(a, "enable", "nosuch", "--replica", b.address, code=2,
           says=("no VM named nosuch", "vm list"))
    for verb in ("initial", "sync", "suspend", "resume", "remove", "status"):
        _fails(a, verb, "nosuch", code=2, says=("nosuch",))
    _fails(a, "vm", "start", "nosuch", code=2, says=("no VM named nosuch",))


def test_enabling_twice(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    a.run("enable", vm_name, "--replica", b.address)
    _fails(a, "enable", vm_name, "--replica", b.address, code=2,
           says=("already replicated to site-b", f"vmreplica remove {vm_name}"))
    a.run("remove", vm_name)


def test_unsupported_disk(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    path = a.vm(vm_name)["disks"][0]["path"]
    import subprocess
    subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", "compat=0.10", path], check=True)
    _fails(a, "enable", vm_name, "--replica", b.address, code=2,
           says=("disk0", "compat 0.10", "qemu-img amend -o compat=1.1", "--exclude-disk"))
    _nothing_replicated(a, b, vm_name)


def test_bad_options(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    _fails(a, "enable", vm_name, "--replica", "not an address", code=2, says=("address",))
    _fails(a, "enable", vm_name, "--replica", b.address, "--exclude-disk", "disk9", code=2,
           says=("no disk 'disk9'", "disk0"))
    _fails(a, "enable", vm_name, "--replica", b.address, "--exclude-disk", "disk0", code=2,
           says=("every disk",))
    _fails(a, "vm", "create", "bad_name!", "--disk", "1G", code=2, says=("invalid VM name",))
    _fails(a, "vm", "create", "x1", "--disk", "12Q", code=2, says=("invalid size",))
    _nothing_replicated(a, b, vm_name)


def test_unpaired_and_unreachable_replica(sites, vm_name, fresh_dir):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    stranger = lab.LabHost(fresh_dir / "c", "site-c").init().start()
    try:
        _fails(a, "enable", vm_name, "--replica", stranger.address, code=1,
               says=("not paired with", "trust token", "trust pair"))
        _fails(a, "test-connection", stranger.address, code=1, says=("not paired",))
    finally:
        stranger.stop()
    _fails(a, "trust", "pair", "127.0.0.1:1", "vmr1-" + "A" * 72, code=1,
           says=("cannot reach 127.0.0.1:1", "connection refused"))
    _fails(a, "trust", "pair", b.address, "garbage", code=2, says=("not a vmreplica pairing token",))
    _nothing_replicated(a, b, vm_name)


def test_unauthorized_primary_and_tag_mismatch(fresh_dir, vm_name):
    a = lab.LabHost(fresh_dir / "a", "primary.example.com").init().start()
    b = lab.LabHost(fresh_dir / "b", "replica.example.com").init().start()
    try:
        lab.pair(a, b)
        a.run("vm", "create", vm_name, "--disk", "32M")
        # Replica server not enabled at all.
        _fails(a, "enable", vm_name, "--replica", b.address, says=("not a replica server",
                                                                    "replica-server enable"))
        # Enabled, but for other primaries only.
        b.run("replica-server", "enable", "--allow", "*.other.org")
        err = _fails(a, "enable", vm_name, "--replica", b.address,
                     says=("primary.example.com is not authorized", "--allow"))
        assert "replica.example.com" in err
        info = a.json("test-connection", b.address)
        assert info["authorized"] is False and info["peer"] == "replica.example.com"
        # Allowed with a security tag: the primary must present the same tag.
        b.run("replica-server", "enable", "--allow", "*.example.com", "--tag", "gold")
        _fails(a, "enable", vm_name, "--replica", b.address, says=("security tag mismatch",
                                                                    "--security-tag gold"))
        _fails(a, "enable", vm_name, "--replica", b.address, "--security-tag", "silver",
               says=("security tag mismatch",))
        # (on libvirt, other runs' existing domains of the system libvirtd are listed too)
        assert a.json("status") == [] and [v for v in b.json("vm", "list")
                                           if v["origin"] == "vmreplica"] == []
        a.run("enable", vm_name, "--replica", b.address, "--security-tag", "gold")
        a.run("initial", vm_name)
        shown = b.json("replica-server", "show")
        assert shown["enabled"] and {e["pattern"] for e in shown["authorizations"]} == {
            "*.other.org", "*.example.com"}
    finally:
        lab.teardown(a, b)


def test_pairing_token_is_single_use(fresh_dir):
    a = lab.LabHost(fresh_dir / "a", "site-a").init().start()
    b = lab.LabHost(fresh_dir / "b", "site-b").init().start()
    c = lab.LabHost(fresh_dir / "c", "site-c").init().start()
    try:
        out = b.run("trust", "token").stdout.strip().splitlines()
        token = out[-1]
        assert token.startswith("vmr1-") and "trust pair" in "\n".join(out[:-1])
        a.run("trust", "pair", b.address, token)
        _fails(c, "trust", "pair", b.address, token, says=("already used", "trust token"))
        # A token from one host does not pair with another (its fingerprint is in it).
        _fails(c, "trust", "pair", a.address, token, says=("does not match",))
        peers = {p["name"] for p in b.json("trust", "list")}
        assert peers == {"site-a"}
    finally:
        lab.teardown(a, b, c)
