"""`vmreplica console` driven through a pseudo-terminal, as an operator would use it."""

from __future__ import annotations

import sys

import pytest

from harness import lab

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.e2e


def test_console_enables_tests_and_removes(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "16M")
    child = pexpect.spawn(lab.cli_path()[0], ["--home", str(a.home), "console"],
                          encoding="utf-8", timeout=60)
    child.logfile_read = sys.stdout
    try:
        child.expect("vmreplica console on site-a")
        child.expect("choice: ")
        child.sendline("4")                                   # enable replication
        child.expect("VM: ")
        child.sendline(vm_name)
        child.expect("replica HOST:PORT: ")
        child.sendline(b.address)
        child.expect(r"frequency .*: ")
        child.sendline("30s")
        child.expect(r"initial copy now\? .*: ")
        child.sendline("y")
        child.expect(r"initial replication of .* acknowledged")
        child.expect("choice: ")
        child.sendline("1")                                   # status
        child.expect(f"{vm_name} +primary +site-b +replicating")
        child.expect("choice: ")
        child.sendline("8")                                   # remove, but say no
        child.expect("VM: ")
        child.sendline(vm_name)
        child.expect(r"\(yes/no\) \[no\]: ")
        child.sendline("")
        child.expect("not removed")
        child.expect("choice: ")
        child.sendline("9")
        child.expect("no such choice")
        child.expect("choice: ")
        child.sendline("8")
        child.expect("VM: ")
        child.sendline(vm_name)
        child.expect(r"\(yes/no\) \[no\]: ")
        child.sendline("yes")
        child.expect(f"replication of {vm_name} removed")
        child.expect("choice: ")
        child.sendline("0")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert all(r["vm"] != vm_name for r in a.json("status"))
