"""One truth for the operator (issue 17, items 5 and 8): continuous mode reads the same
on both hosts and in every view; bulk verbs share one rule; recovery point ids after a
failback; sizes and words in events; a suspended relationship is a warning; the
dashboard forgets a cycle error after a good cycle; a replica-side remove of a mirrored
VM leaves no swallowed error in the primary's log. Real daemons, real QEMU."""

from __future__ import annotations

import functools
import time

import pytest

from harness import lab
from helpers import recent_events, wait_until
from vmreplica.hypervisor.guest import read_demo_records

pytestmark = pytest.mark.e2e

_wait = functools.partial(wait_until, timeout=60)


@pytest.fixture(scope="module")
def pair(lab_root, driver):
    a, b = lab.two_sites(lab_root / f"views-{driver}", driver=driver)
    yield a, b
    lab.teardown(a, b)


def _status(host, vm):
    return host.json("status", vm)[0]


def test_continuous_mode_reads_the_same_on_both_hosts(pair):
    a, b = pair
    vm = "views-cont"
    a.run("vm", "create", vm, "--disk", "64M", "--guest", "demo")
    a.run("vm", "start", vm)
    _wait("records", lambda: (read_demo_records(a.vm(vm)["disks"][-1]["path"])["top"]
                              or 0) >= 3)
    a.run("enable", vm, "--replica", b.address, "--frequency", "30s", "--mode", "continuous")
    a.run("initial", vm)
    explain = lambda: recent_events(a, vm) + "\n" + recent_events(b, vm)  # noqa: E731
    _wait("in_sync", lambda: _status(a, vm)["sync_state"] == "in_sync", explain=explain)
    # The replica learns the mode and the sub-state from the primary.
    _wait("the replica's MODE", lambda: _status(b, vm)["mode_label"] == "cont:in_sync",
          timeout=20, explain=explain)
    for host in (a, b):
        st = _status(host, vm)
        assert st["mode"] == "continuous" and st["mode_label"] == "cont:in_sync", st
        assert st["lag_seconds"] == 0, st          # the replica has every acknowledged write
        # The demo guest writes every 100 ms: the last write the mirror carried is recent.
        assert st["last_write_at"] and time.time() - st["last_write_at"] < 5, st
        assert time.time() - st["last_cycle_at"] < 5, st       # LAST SYNC: that write
        text = host.run("status", vm).stdout
        assert "cont:in_sync" in text and "30s" not in text, text
        m = host.json("measure", vm)
        assert m["mode"] == "continuous" and m["sync_state"] == "in_sync", m
        assert m["lag_seconds"] == 0 and m["missed_cycles"] == 0, m
        text = host.run("measure", vm).stdout
        assert "continuous, in sync" in text and "frequency" not in text, text
        print(text)
    assert a.json("measure", vm)["pending_bytes"] == 0     # the mirror has it all
    # Back to periodic: the replica shows the frequency again.
    a.run("set", vm, "--mode", "periodic")
    _wait("the replica back to periodic", lambda: _status(b, vm)["mode_label"] == "30s",
          timeout=20, explain=explain)
    assert "frequency" not in a.run("measure", vm).stdout
    assert "periodic, every 30s" in b.run("measure", vm).stdout
    # Continuous again, then removed from the replica's side: the primary's watchdog ends
    # without a swallowed error (it logged "bringing the mirror of VM back: 'disk0'").
    a.run("set", vm, "--mode", "continuous")
    _wait("in_sync again", lambda: _status(a, vm)["sync_state"] == "in_sync", explain=explain)
    log = a.home / "daemon.log"
    start = log.stat().st_size
    b.run("remove", vm)
    _wait("removed on the primary", lambda: not a.json("status")
          or all(r["vm"] != vm for r in a.json("status")))
    deadline = time.monotonic() + 3          # a watchdog tick or two after the removal
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(start)
            tail = f.read().decode(errors="replace")
        assert "'disk0'" not in tail and "mirror of views-cont back" not in tail, tail
        time.sleep(0.5)
    a.run("vm", "stop", vm, "--force")
    a.run("vm", "delete", vm)


def test_bulk_rule_sizes_and_words(pair):
    import re
    import subprocess
    a, b = pair
    v1, v2 = "views-b1", "views-b2"
    for n in (v1, v2):
        a.run("vm", "create", n, "--disk", "64M")
    # 8 MiB of data on v1's disk: the replica's `latest` shows that, not its file's size.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 8M",
                    a.vm(v1)["disks"][0]["path"]], check=True, capture_output=True)
    a.run("vm", "tag", v1, v2, "--add", "views")
    a.run("enable", v1, "--replica", b.address)
    # One rule: with --tag, a VM the verb has nothing to do for is skipped, not failed.
    p = a.run("enable", "--tag", "views", "--replica", b.address, check=False)
    assert p.returncode == 0, p.stderr
    assert f"{v1}: skipped: already replicated" in p.stdout, p.stdout
    assert "1 of 1 VM(s) done; 1 skipped" in p.stdout, p.stdout
    p = a.run("initial", "--tag", "views", check=False)
    assert p.returncode == 0 and "2 of 2 VM(s) done" in p.stdout, (p.stdout, p.stderr)
    p = a.run("initial", "--tag", "views", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("skipped: already seeded") == 2, p.stdout
    p = a.run("resume", "--tag", "views", check=False)
    assert p.returncode == 0 and p.stdout.count("skipped: not suspended") == 2, p.stdout
    a.run("suspend", "--tag", "views")
    p = a.run("suspend", "--tag", "views", check=False)
    assert p.returncode == 0 and p.stdout.count("skipped: already suspended") == 2, p.stdout
    # Named on the command line, the verb's own answer: enabling twice fails.
    assert a.run("enable", v1, "--replica", b.address, check=False).returncode == 2
    # Suspended is the operator's choice: a warning with its reason, not critical.
    st = _status(a, v1)
    assert st["health"] == "warning" and "suspended by the operator" in st["reasons"][0], st
    a.run("resume", "--tag", "views")
    # Each point shows the data its own layer holds: the 8 MiB in the first one, and
    # `latest` (the head: its file holds qcow2 metadata, not data) only what came since: nothing.
    pts = b.json("points", v1)
    assert 8 << 20 <= sum(pt["size"] for pt in pts) <= 9 << 20, pts
    assert [pt["size"] for pt in pts if pt["id"] == "latest"] == [0], pts
    assert "8.0 MiB" in b.run("points", v1).stdout
    a.run("resync", v1, "--now")
    words = [e["message"] for n in (v1, v2) for host in (a, b) for e in host.json("events", n)]
    text = "\n".join(words)
    assert "resynchronis" not in text and "resynchronized: " in text, text
    assert not re.search(r"\d{5,} bytes", text), text          # sizes, not byte counts
    assert "64.0 MiB compared" in text, text
    a.run("remove", "--tag", "views")
    a.run("vm", "delete", "--tag", "views")
