"""The namespace cluster lab itself: real Corosync (knet), Pacemaker and corosync-qnetd, two
nodes and a witness in namespaces, fencing on through fence_vmreplica and the lab's PDU.

One test walks the whole life of a cluster (it costs one formation): formation, quorum
with the witness, a Dummy resource, power-off failover with fencing, rejoin, corosync
killed (fenced for real), a cut heartbeat with the witness deciding, heal, and a
teardown that leaves nothing behind. Timings are printed.
"""

from __future__ import annotations

import calendar
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import nslab
from harness.fence_vmreplica import METADATA

pytestmark = pytest.mark.integration

_probe: list = []


@pytest.fixture
def namespaces():
    """Skip (with the reason) only where the lab's namespaces cannot be made; probed once."""
    if not _probe:
        _probe.append(nslab.namespaces_available())
    ok, why = _probe[0]
    if not ok:
        pytest.skip(f"no namespaces for the cluster lab: {why}")


DUMMY = ('<primitive id="dummy" class="ocf" provider="pacemaker" type="Dummy">'
         '<meta_attributes id="dummy-meta">'
         '<nvpair id="dummy-stickiness" name="resource-stickiness" value="100"/>'
         '</meta_attributes>'
         '<operations><op id="dummy-monitor" name="monitor" interval="5s"/></operations>'
         '</primitive>')


def _report(capsys, text):
    with capsys.disabled():
        print(f"\n[cluster-lab] {text}", flush=True)


def _other(lab, node):
    return next(n for n in lab.nodes if n != node)


def _dummy_on(lab, seen_from):
    s = lab.status(seen_from)
    return s.running_on("dummy") if s else None


def _fenced_off(lab, seen_from, target, since):
    """The newest successful fencing of target completed after `since` (epoch seconds),
    as seen_from's fencer knows it."""
    for ev in reversed(lab.fence_history(seen_from, target)):
        if ev.get("target") == target and ev.get("status") == "success" \
                and ev.get("action") in ("off", "reboot") and ev.get("completed"):
            when = calendar.timegm(time.strptime(ev["completed"][:19], "%Y-%m-%d %H:%M:%S"))
            if when >= int(since) - 1:
                return ev
    return None


def _pdu_did(lab, cmd, node, since):
    return [e for e in lab.pdu_log if e[0] >= since and e[1] == cmd and e[2] == node
            and e[3].startswith("ok")]


def _cpu_percent(lab, seconds=10.0):
    a, t0 = lab.stack_cpu_seconds(), time.monotonic()
    time.sleep(seconds)   # the measurement window itself, not a wait for a condition
    b, t1 = lab.stack_cpu_seconds(), time.monotonic()
    per = {k: 100 * (b.get(k, 0) - a.get(k, 0)) / (t1 - t0) for k in b}
    groups = {"corosync": sum(v for k, v in per.items() if k == "corosync"),
              "qdevice": sum(v for k, v in per.items() if k.startswith("corosync-qdev")),
              "qnetd": sum(v for k, v in per.items() if k.startswith("corosync-qnet")),
              "pacemaker": sum(v for k, v in per.items() if k.startswith("pacemaker"))}
    return groups


def _tcp(lab, node, host, port):
    """Try a TCP connection from inside node: connected, refused (reachable, nothing
    listens) or timeout (unreachable)."""
    code = ("import socket,sys\n"
            "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 1.5); print('connected')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError: print('timeout')\n")
    return lab.run(node, ["python3", "-c", code, host, str(port)]).stdout.strip()


def _lab_leftovers(lab):
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [ns for ns in (lab.netns(n) for n in (*lab.nodes, "witness")) if ns in names]


def test_fence_agent_metadata_and_cli(namespaces, tmp_path):
    """The agent's metadata is valid XML that Pacemaker reads (parameters, actions), its
    exit codes follow the fence-agents API, and it reports an absent PDU as an error."""
    from harness import fence_vmreplica as fa
    root = ET.fromstring(METADATA)
    assert root.tag == "resource-agent" and root.get("name") == "fence_vmreplica"
    params = {p.get("name") for p in root.iter("parameter")}
    assert {"action", "plug", "port", "pdu_socket"} <= params
    assert {a.get("name") for a in root.iter("action")} >= {"on", "off", "reboot", "status",
                                                            "monitor", "list", "metadata"}
    path = fa.install_fence_agent(tmp_path / "fence_vmreplica")
    p = subprocess.run([path], input="action=metadata\n", capture_output=True, text=True)
    assert p.returncode == 0 and ET.fromstring(p.stdout).get("name") == "fence_vmreplica"
    p = subprocess.run([path, "-o", "status", "-n", "node1", "--pdu-socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True)
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = subprocess.run([path], input="action=off\nplug=node1\n", capture_output=True, text=True)
    assert p.returncode == 1 and "pdu_socket" in p.stderr
    p = subprocess.run([path, "-o", "dance"], capture_output=True, text=True)
    assert p.returncode == 1
    # Pacemaker's own view of the installed agent.
    fa.install_fence_agent()
    p = subprocess.run(["stonith_admin", "--list-installed"], capture_output=True, text=True)
    assert "fence_vmreplica" in p.stdout
    p = subprocess.run(["stonith_admin", "--metadata", "--agent", "fence_vmreplica"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "pdu_socket" in p.stdout


def test_cluster_lab_life(namespaces, fresh_dir, capsys):
    lab = nslab.ClusterLab(fresh_dir / "cl")
    try:
        t0 = time.monotonic()
        lab.start()
        started = time.monotonic() - t0
        formed = lab.wait_formed(60)
        _report(capsys, f"lab built in {started:.1f} s (namespaces, certificates, boot); "
                        f"cluster formed {formed:.1f} s after power-on (fencing ready)")
        n1, n2 = lab.nodes

        # Isolation: own hostname, own PID 1, own /etc/corosync, heartbeat addresses.
        assert lab.run(n1, ["hostname"]).stdout.strip() == n1
        assert lab.run(n2, ["cat", "/proc/1/comm"]).stdout.strip().startswith("python")
        assert lab.address(n1) in lab.run(n1, ["cat", "/etc/corosync/corosync.conf"]).stdout
        assert not os.path.exists("/run/" + nslab.BOOT_MARK)
        # The witness bridge isolates its ports: node1 reaches qnetd but not node2 there,
        # while node2 answers (refuses) on the heartbeat link.
        assert _tcp(lab, n1, lab.witness_address(), 5403) == "connected"
        assert _tcp(lab, n1, lab.witness_address(n2), 5403) == "timeout"
        assert _tcp(lab, n1, lab.address(n2), 5403) == "refused"

        # Quorum with the witness: 3 expected votes, the qdevice casting one.
        agent = ["/usr/sbin/fence_vmreplica", "--pdu-socket", str(lab.pdu_socket)]
        p = subprocess.run(agent + ["-o", "list"], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.split() == [f"{n1},", f"{n2},"]
        assert subprocess.run(agent + ["-o", "monitor"]).returncode == 0
        q = lab.run(n1, ["corosync-quorumtool", "-s"]).stdout
        assert "Quorate:          Yes" in q and "Qdevice" in q and "Expected votes:   3" in q
        for n in lab.nodes:
            s = lab.crm_mon_xml(n)
            assert s.quorate and s.online() == [n1, n2] and s.dc in lab.nodes

        cpu = _cpu_percent(lab)
        _report(capsys, "idle CPU (% of one core, both nodes): "
                        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))

        # A Dummy resource runs on exactly one node.
        p = lab.run(n1, ["cibadmin", "--create", "-o", "resources", "--xml-text", DUMMY])
        assert p.returncode == 0, p.stderr
        where = nslab.wait_for(lambda: _dummy_on(lab, n1), 20, what="dummy to start")
        assert len(where) == 1 and _dummy_on(lab, n2) == where
        victim = where[0]
        survivor = _other(lab, victim)

        # 1. Power off the node running it: fenced (PDU "off"), resource on the survivor.
        sleeper = lab.popen(victim, ["sleep", "600"])   # stands for a VM started in the node
        assert nslab.wait_for(lambda: len(lab.processes(victim)) > 5, 5, what="the sleeper")
        since = time.time()
        t = time.monotonic()
        lab.power_off(victim)
        assert not lab.is_on(victim) and lab.pid(victim) is None and lab.processes(victim) == []
        assert sleeper.wait(timeout=5) != 0
        nslab.wait_for(lambda: _dummy_on(lab, survivor) == [survivor], 15,
                       what=f"dummy on {survivor}")
        failover = time.monotonic() - t
        ev = nslab.wait_for(lambda: _fenced_off(lab, survivor, victim, since), 15,
                            what=f"fencing of {victim} in the history")
        assert ev["action"] == "off" and ev.get("delegate") == survivor, ev
        assert _pdu_did(lab, "off", victim, since)
        s = lab.crm_mon_xml(survivor)
        assert s.quorate and s.online() == [survivor] and not s.nodes[victim].unclean
        _report(capsys, f"power-off of {victim}: dummy running on {survivor} after "
                        f"{failover:.1f} s; fenced ({ev['action']}) by {ev.get('delegate')}")

        # Power it back on: it rejoins; the resource stays where it is (stickiness).
        t = time.monotonic()
        lab.power_on(victim)
        lab.wait_formed(60)
        rejoin = time.monotonic() - t
        assert _dummy_on(lab, victim) == [survivor]
        _report(capsys, f"power-on of {victim}: online again after {rejoin:.1f} s")

        # 2. Kill corosync on the node running the resource: the other node fences it
        #    through the PDU (its init is gone) and takes the resource.
        holder, other = survivor, victim
        since = time.time()
        old_init = lab.pid(holder)
        coro = [p for p in lab.processes(holder)
                if Path(f"/proc/{p}/comm").read_text().strip() == "corosync"]
        assert len(coro) == 1
        t = time.monotonic()
        os.kill(coro[0], signal.SIGKILL)
        nslab.wait_for(lambda: _dummy_on(lab, other) == [other], 15, what=f"dummy on {other}")
        takeover = time.monotonic() - t
        nslab.wait_for(lambda: not lab.is_on(holder), 10, what=f"{holder} powered off")
        assert not os.path.exists(f"/proc/{old_init}") and lab.processes(holder) == []
        ev = nslab.wait_for(lambda: _fenced_off(lab, other, holder, since), 15,
                            what=f"fencing of {holder} in the history")
        assert _pdu_did(lab, "off", holder, since), lab.pdu_log
        p = subprocess.run(agent + ["-o", "status", "-n", holder], capture_output=True, text=True)
        assert p.returncode == 2 and "OFF" in p.stdout
        _report(capsys, f"corosync killed on {holder}: fenced by the PDU, dummy on {other} "
                        f"after {takeover:.1f} s")
        t = time.monotonic()
        lab.power_on(holder)
        lab.wait_formed(60)
        _report(capsys, f"power-on of {holder}: online again after {time.monotonic() - t:.1f} s")

        # 3. Cut the heartbeat with the witness up. Fencing reboots the loser (so it comes
        #    back by itself): exactly one partition is quorate and runs the resource.
        p = lab.run(n1, ["crm_attribute", "--type", "crm_config", "--name", "stonith-action",
                         "--update", "reboot"])
        assert p.returncode == 0, p.stderr
        # Put the resource on the node with the higher id (the one qnetd's ffsplit tie-breaker
        # does not favour), so that the cut has to move it.
        if _dummy_on(lab, n1) != [n2]:
            assert lab.run(n1, ["crm_resource", "--move", "-r", "dummy", "-N", n2]).returncode == 0
            nslab.wait_for(lambda: _dummy_on(lab, n1) == [n2], 20, what=f"dummy moved to {n2}")
            assert lab.run(n1, ["crm_resource", "--clear", "-r", "dummy"]).returncode == 0
        owner = _dummy_on(lab, n1)[0]
        since = time.time()
        t = time.monotonic()
        lab.cut_link()
        assert not lab.link_is_up()

        took_over = {}

        def split_settled():
            views = {n: lab.status(n) for n in lab.nodes}
            for n, v in views.items():
                if v and v.quorate and v.running_on("dummy") == [n] and v.online() == [n]:
                    took_over.setdefault(n, time.monotonic() - t)
            if any(v is None for v in views.values()):
                return None
            winners = [n for n, v in views.items() if v.quorate]
            if len(winners) != 1:
                return None
            win = winners[0]
            lose = _other(lab, win)
            if views[win].running_on("dummy") != [win] or views[win].online() != [win]:
                return None
            # The loser, rebooted by the fencing, is up again on its own side, without quorum.
            if views[lose].running_on("dummy") or views[lose].online() != [lose] \
                    or views[lose].quorate:
                return None
            return win, lose, views
        win, lose, _views = nslab.wait_for(split_settled, 60, 0.5, what="one quorate partition")
        split = time.monotonic() - t
        assert _pdu_did(lab, "off", lose, since) and _pdu_did(lab, "on", lose, since)
        ev = nslab.wait_for(lambda: _fenced_off(lab, win, lose, since), 15,
                            what=f"fencing of {lose} in the history")
        assert ev["action"] == "reboot" and ev.get("delegate") == win, ev
        _report(capsys, f"heartbeat cut: {win} keeps quorum and runs dummy after "
                        f"{took_over[win]:.1f} s (was on {owner}); {lose} fenced (rebooted) and "
                        f"up again without quorum after {split:.1f} s")

        t = time.monotonic()
        lab.heal_link()
        lab.wait_formed(60)
        healed = time.monotonic() - t
        for n in lab.nodes:
            assert _dummy_on(lab, n) == [win]
        _report(capsys, f"heartbeat healed: both online, dummy once on {win} after {healed:.1f} s")
    finally:
        lab.stop()
    # Nothing left behind: no namespaces, no processes, no root.
    assert _lab_leftovers(lab) == []
    assert not (fresh_dir / "cl").exists()
    lab.stop()                                    # idempotent
