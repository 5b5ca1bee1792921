"""A disaster-recovery link that follows the VM (primary.dr): the demo guest replicates
continuously from site-a to site-b and periodically to a third host, site-dr. The VM
moves to site-b (planned failover and reverse); site-b takes the DR link over and only
the differences move; site-a stands by. The DR host failing the VM over meanwhile (the
"both sides fail over" case) makes it refuse the take-over: nothing it holds is
overwritten. (On the cluster the take-over is automatic: tests/e2e/test_ha.py.)"""

from __future__ import annotations

import functools
import os
import signal
import threading

import pytest

from harness import lab
from helpers import recent_events, wait_until
from vmreplica.hypervisor.guest import read_demo_records
from vmreplica.hypervisor.qemu import QemuDriver

pytestmark = pytest.mark.e2e

VM = "dr-vm"
_wait = functools.partial(wait_until, timeout=60)


@pytest.fixture(scope="module")
def sites(lab_root):
    a, b = lab.two_sites(lab_root / "dr", names=("site-a", "site-b"))
    c = lab.LabHost(lab_root / "dr" / "c", "site-dr").init().start()
    lab.pair(a, c)
    c.run("replica-server", "enable", "--allow", "site-*")
    yield a, b, c
    lab.teardown(a, b, c)


class _Writer:
    """Writes 1 MiB blocks into the running VM's first disk through its device until
    stopped (at most 200)."""

    def __init__(self, host):
        self.host, self.done = host, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        for i in range(200):
            if self._stop.is_set():
                return
            self.host.run("vm", "io", VM, "disk0", f"write -P {i % 200 + 30} {(i * 3) % 60}M 1M")
            self.done += 1

    def stop(self):
        self._stop.set()
        self._t.join(60)


def _state(host, key):
    return host.json("status", key)[0]["state"]


def test_dr_link_follows_the_vm_and_moves_only_the_differences(sites):
    a, b, c = sites
    a.run("vm", "create", VM, "--disk", "64M", "--disk", "32M", "--guest", "demo",
          "--share-rw")
    a.run("vm", "start", VM)
    for i in range(24):                                  # data for the DR copy to read
        a.run("vm", "io", VM, "disk0", f"write -P {i + 1} {i * 2}M 1M")
    _wait("records", lambda: (read_demo_records(a.vm(VM)["disks"][-1]["path"])["top"] or 0) >= 3)
    a.run("enable", VM, "--replica", b.address, "--mode", "continuous")
    a.run("initial", VM)
    _wait("in_sync", lambda: a.json("status", VM)[0]["sync_state"] == "in_sync",
          explain=lambda: recent_events(a, VM))

    # The partner (site-b) could not take the link over without trusting site-dr: refused,
    # and nothing is created anywhere.
    p = a.run("enable", VM, "--replica", c.address, "--dr", check=False)
    assert p.returncode != 0 and "site-b is not paired with site-dr" in p.stderr, p.stderr
    assert "trust pair" in p.stderr
    assert c.json("status") == [] and [r["vm"] for r in a.json("status")] == [VM]

    p = a.run("sync", "no-such-vm@dr", check=False)
    assert p.returncode != 0 and "no-such-vm has no DR link on site-a" in p.stderr, p.stderr
    lab.pair(b, c)
    out = a.run("enable", VM, "--replica", c.address, "--dr", "--frequency", "15m").stdout
    assert "follows the VM to site-b" in out, out
    key = f"{VM}@dr"
    # A fleecing job is impossible while the continuous mirror holds the disks: a DR
    # cycle reads them live while the guest writes, then pauses it briefly to read again
    # the blocks written meanwhile. Writes go on through both cycles; the verification
    # (paused: it compares the replica with the disks at the cycle's end) proves the
    # copy converged.
    writer = _Writer(a)
    first = a.json("initial", key)
    deltas = []
    while writer.done < 20 and len(deltas) < 40:
        deltas.append(a.json("sync", key))
    writer.stop()
    assert first["raw_bytes"] >= 24 << 20 and first.get("guest_paused_seconds", 9) < 1.0, \
        (first, recent_events(a, VM), recent_events(a, key))
    worst = max(d["guest_paused_seconds"] for d in deltas)
    assert worst < 1.0 and sum(d["raw_bytes"] for d in deltas) >= 1 << 20, deltas
    print(f"DR cycles beside the continuous mirror while {writer.done} 1 MiB writes went on: "
          f"initial {first['raw_bytes']} bytes, guest paused {first['guest_paused_seconds']:.3f} s;"
          f" {len(deltas)} deltas, longest pause {worst:.3f} s")
    assert a.json("sync", key, "--verify")["verified"]
    assert _state(a, VM) == "replicating" and a.json("status", VM)[0]["sync_state"] == "in_sync"

    # The VM moves to site-b (planned failover, then reverse: site-a is its replica).
    a.run("failover", VM, "--prepare", "--shutdown")
    b.run("failover", VM)
    b.run("reverse", VM)
    _wait("site-a's DR link standing by", lambda: _state(a, key) == "standby")

    # The DR host fails the VM over meanwhile: the take-over is refused, nothing on the DR
    # host changes; once it cancels its failover the take-over goes through.
    before = c.json("status", VM)[0]
    c.run("failover", VM)
    p = b.run("dr", "adopt", VM, check=False)
    assert p.returncode != 0 and "site-dr has failed VM dr-vm over" in p.stderr, p.stderr
    after = c.json("status", VM)[0]
    assert (after["epoch"], after["cycle"]) == (before["epoch"], before["cycle"])
    assert after["state"] == "failover_in_progress"
    c.run("failover", VM, "--cancel")

    moved = b.json("dr", "adopt", VM)
    disk_bytes = sum(d["virtual_size"] for d in b.vm(VM)["disks"])
    print(f"DR link taken over by site-b: {moved['bytes_moved']} bytes moved of {disk_bytes}")
    assert moved["state"] == "replicating" and moved["epoch"] == before["epoch"] + 1
    assert moved["bytes_moved"] < disk_bytes / 10, moved
    assert c.json("status", VM)[0]["peer"] == "site-b"
    # The next cycle from the new node: the DR replica equals the frozen point.
    assert b.json("sync", key, "--verify")["verified"]
    # The host the VM left is out of the DR replication: it cannot run a cycle.
    p = a.run("sync", key, check=False)
    assert p.returncode != 0 and "standby" in p.stderr
    events = " ".join(e["message"] for e in c.json("events", VM))
    assert "moved from site-a to site-b" in events

    # A daemon that dies while it holds the guest paused (a cycle's settle(), continuous
    # mode's hand-over: both through the driver's pause mark): the next daemon resumes it.
    os.kill(b.daemon_pid(), signal.SIGKILL)
    drv = QemuDriver(b.home, {})
    drv.pause(VM)                                      # what the dead daemon had done
    with drv.monitor(VM, timeout=10) as m:
        assert m.execute("query-status")["status"] == "paused"
    assert list((b.home / "run").glob("*.paused-by-vmreplica")), "pause() left no mark"
    b.start()
    assert b.json("vm", "check", VM)["qmp"] == "running"
    assert not list((b.home / "run").glob("*.paused-by-vmreplica"))
    assert any("previous daemon died while it held the VM paused" in e["message"]
               for e in b.json("events", VM))
    b.run("remove", key)
    a.run("remove", key)                       # standby: removed here, the DR side kept
