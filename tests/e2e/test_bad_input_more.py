"""More bad input, with real daemons (issue 17, items 6 and 7): each error names what is
wrong, where to fix it, and exits non-zero; a mistyped pairing token is recognised as
such and does not use the token up."""

from __future__ import annotations

import json
import sys

import pytest

from harness import lab
from helpers import fails

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("qemu_driver_only")]


_fails = fails


def _retyped(token: str, at: int) -> str:
    """The token with one character typed wrong (still valid base64url)."""
    return token[:at] + ("B" if token[at] != "B" else "C") + token[at + 1:]


# Token layout after "vmr1-": 8 base64 characters of id, 22 of secret, 42 of fingerprint.
ID_AT, SECRET_AT, FP_AT = 5 + 3, 5 + 15, 5 + 50


def test_mistyped_pairing_token(fresh_dir):
    a = lab.LabHost(fresh_dir / "a", "site-a").init().start()
    b = lab.LabHost(fresh_dir / "b", "site-b").init().start()
    try:
        token = b.run("trust", "token").stdout.strip().splitlines()[-1]
        b_fp = b.json("host")["fingerprint"]
        # A typo in the fingerprint part: both fingerprints in full, the difference
        # marked, the token (not the address) suspected, and site-b named.
        err = _fails(a, "trust", "pair", b.address, _retyped(token, FP_AT), code=1,
                     says=(b_fp, "^", "mistyped", "the token may be wrong",
                           "`vmreplica trust token` on site-b"))
        assert "check the address" not in err
        lines = err.splitlines()
        shown = [ln for ln in lines if "sha256:" in ln]
        assert len(shown) == 2 and all(len(ln.split("sha256:")[1]) == 64 for ln in shown)
        # A typo in the secret: refused by site-b, which says so by name, and the token
        # is not used up by it ...
        _fails(a, "trust", "pair", b.address, _retyped(token, SECRET_AT), code=1,
               says=("refused by site-b", "mistyped", "`vmreplica trust token` on site-b"))
        # ... nor by a typo in its id (a token site-b never issued).
        err = _fails(a, "trust", "pair", b.address, _retyped(token, ID_AT), code=1,
                     says=("refused by site-b", "no such token", "mistyped",
                           f"`vmreplica trust token` on site-b ({b.address})"))
        assert "on this host" not in err
        # The token copied right still pairs.
        a.run("trust", "pair", b.address, token)
        assert {p["name"] for p in b.json("trust", "list")} == {"site-a"}
        _fails(a, "trust", "pair", b.address, token, code=1,
               says=("already used", "`vmreplica trust token` on site-b"))
    finally:
        lab.teardown(a, b)


def test_vm_create_refusals(sites, vm_name):
    a, b = sites
    # More memory than the host has: refused at create, not at start.
    _fails(a, "vm", "create", vm_name, "--disk", "16M", "--memory", "100000000", code=2,
           says=("memory 100000000 MB is more than site-a has", "--memory at most"))
    # A negative disk size, as a separate word or with '='.
    for argv in (("--disk", "-1G"), ("--disk=-1G",)):
        err = _fails(a, "vm", "create", vm_name, *argv, code=2,
                     says=("disk size must be positive",))
        assert "expected one argument" not in err
    assert all(v["name"] != vm_name for v in a.json("vm", "list"))
    # A name taken by a VM, replicated or not: the VM is what is named.
    a.run("vm", "create", vm_name, "--disk", "16M")
    _fails(a, "vm", "create", vm_name, "--disk", "16M", code=2,
           says=(f"a VM named {vm_name} exists on site-a",))
    a.run("enable", vm_name, "--replica", b.address)
    try:
        for host, role in ((a, "primary"), (b, "replica")):
            err = _fails(host, "vm", "create", vm_name, "--disk", "16M", code=2,
                         says=(f"a VM named {vm_name} exists on {host.name}", f"{role} side"))
            assert "a replication relationship named" not in err
    finally:
        a.run("remove", vm_name)
    a.run("vm", "delete", vm_name)


def test_initial_import_on_the_primary_names_the_replica(sites, vm_name, fresh_dir):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "16M")
    a.run("enable", vm_name, "--replica", b.address)
    try:
        err = _fails(a, "initial", vm_name, "--import", str(fresh_dir), code=2,
                     says=(f"site-a is the primary of {vm_name}", "imported on its replica",
                           "site-b", f"`vmreplica initial {vm_name} --import DIR` there"))
        assert "enable replication on the primary first" not in err
        # On a host that holds no relationship at all, the old advice stands, with the
        # command to run on the primary.
        _fails(b, "initial", "nosuch", "--import", str(fresh_dir), code=2,
               says=("site-b holds no replica of nosuch", f"--replica {b.address}"))
    finally:
        a.run("remove", vm_name)
    a.run("vm", "delete", vm_name)


def _qemu_only(a):
    if a.driver != "qemu":
        pytest.skip("QEMU's log and `vm io` are the embedded qemu driver's")


def test_qemu_start_failure_shows_qemus_reason(sites, vm_name):
    a, _ = sites
    _qemu_only(a)
    a.run("vm", "create", vm_name, "--disk", "16M")
    # The memory check at create cannot see what a VM asks for later (a VM defined from
    # another host's description, an edited one): QEMU's own words must then reach the
    # operator instead of "exit 1".
    desc_path = a.home / "vms" / vm_name / "vm.json"
    desc = json.loads(desc_path.read_text())
    desc["memory_mb"] = 200_000_000          # more than any address space
    desc_path.write_text(json.dumps(desc))
    try:
        err = _fails(a, "vm", "start", vm_name, code=1,
                     says=(f"QEMU could not start {vm_name}: ", "memory", "qemu.log"))
        assert "exit 1" not in err.splitlines()[0]
    finally:
        a.run("vm", "delete", vm_name)


def test_vm_io_errors_exit_non_zero(sites, vm_name):
    a, _ = sites
    _qemu_only(a)
    a.run("vm", "create", vm_name, "--disk", "32M", "--disk", "16M", "--share-rw")
    a.run("vm", "start", vm_name)
    try:
        _fails(a, "vm", "io", vm_name, "disk9", "write 0 4k", code=2,
               says=(f"{vm_name} has no disk 'disk9'", "disk0, disk1"))
        _fails(a, "vm", "io", vm_name, "disk0", "bogus 0 4k", code=2,
               says=("qemu-io rejects 'bogus 0 4k'", 'command "bogus" not found'))
        _fails(a, "vm", "io", vm_name, "disk1", "write 30M 1M", code=2,
               says=("qemu-io rejects", "16.0 MiB"))
        ok = a.run("vm", "io", vm_name, "disk0", "write -P 7 0 64k")
        assert ok.returncode == 0 and ok.stderr == ""
    finally:
        a.run("vm", "stop", vm_name, "--force")
        a.run("vm", "delete", vm_name)


def test_console_does_not_offer_the_initial_copy_after_enable_failed(sites):
    pexpect = pytest.importorskip("pexpect")
    a, b = sites
    child = pexpect.spawn(lab.cli_path()[0], ["--home", str(a.home), "console"],
                          encoding="utf-8", timeout=60)
    child.logfile_read = sys.stdout
    try:
        child.expect("choice: ")
        child.sendline("4")                                   # enable replication
        child.expect("VM: ")
        child.sendline("no-such-vm")
        child.expect("replica HOST:PORT: ")
        child.sendline(b.address)
        child.expect(r"frequency .*: ")
        child.sendline("30s")
        child.expect(r"\(failed, exit 2\)")
        i = child.expect([r"initial copy now", "choice: "])
        assert i == 1, "the console offered an initial copy after enable failed"
        assert "not enabled" in child.before
        child.sendline("0")
        child.expect(pexpect.EOF)
    finally:
        child.close()
