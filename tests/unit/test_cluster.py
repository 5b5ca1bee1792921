"""The cluster pieces that need no cluster: SafeKit states, the generated Corosync
configuration, `cluster setup`'s refusal without fencing, the agents' meta-data."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vmreplica.cluster import agent, pacemaker
from vmreplica.domain.cluster import vm_states


@pytest.mark.parametrize("nodes,running,in_sync,expected", [
    ({"a": True, "b": True}, ["a"], True, {"a": "PRIM", "b": "SECOND"}),
    ({"a": True, "b": True}, ["a"], False, {"a": "ALONE", "b": "WAIT"}),
    ({"a": True, "b": False}, ["a"], False, {"a": "ALONE", "b": "STOP"}),
    ({"a": True, "b": True}, [], False, {"a": "WAIT", "b": "WAIT"}),
    # Two copies running is never "in sync", whatever the replication says.
    ({"a": True, "b": True}, ["a", "b"], True, {"a": "ALONE", "b": "ALONE"}),
])
def test_safekit_states(nodes, running, in_sync, expected):
    assert vm_states(nodes, running, in_sync) == expected


def test_corosync_conf_with_witness_and_two_node():
    conf = pacemaker.corosync_conf("c1", [("n1", "10.0.0.1"), ("n2", "10.0.0.2")], "10.0.0.9")
    assert "transport: knet" in conf
    assert conf.count("node {") == 2 and "ring0_addr: 10.0.0.2" in conf
    assert "model: net" in conf and "host: 10.0.0.9" in conf and "ffsplit" in conf
    assert "two_node" not in conf
    assert conf.count("{") == conf.count("}")
    plain = pacemaker.corosync_conf("c1", [("n1", "10.0.0.1"), ("n2", "10.0.0.2")], None)
    assert "two_node: 1" in plain and "model: net" not in plain


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vmreplica.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


def test_setup_refuses_without_fencing_and_says_why():
    p = _cli("cluster", "setup", "n1=10.0.0.1", "n2=10.0.0.2", "--witness", "10.0.0.9")
    assert p.returncode == 2
    assert "split brain" in p.stderr and "--no-fencing" in p.stderr
    p = _cli("cluster", "setup", "n1=10.0.0.1", "n2=10.0.0.2", "--no-fencing")
    assert p.returncode == 0 and "stonith-enabled=false" in p.stdout
    assert "WARNING" in p.stdout
    p = _cli("cluster", "setup", "n1=10.0.0.1", "n2=10.0.0.2", "--fence-agent",
             "fence_ipmilan", "--fence-option", "ip=10.0.1.1")
    assert p.returncode == 0 and "stonith-enabled=true" in p.stdout
    assert "fence_ipmilan" in p.stdout


@pytest.mark.parametrize("kind,params", [
    ("vm", {"vm", "homes", "stop_mode", "stop_timeout", "agent_grace"}),
    ("daemon", {"homes"}),
])
def test_agent_meta_data_documents_every_parameter(kind, params, capsys):
    assert agent.main([kind, "meta-data"]) == agent.OCF_SUCCESS
    root = ET.fromstring(capsys.readouterr().out)
    found = {p.get("name") for p in root.iter("parameter")}
    assert found == params
    for p in root.iter("parameter"):
        assert p.findtext("longdesc").strip() and p.findtext("shortdesc").strip()
    actions = {a.get("name") for a in root.iter("action")}
    assert {"start", "stop", "monitor", "meta-data", "validate-all"} <= actions


def test_agent_refuses_a_bad_configuration(monkeypatch):
    monkeypatch.setenv("OCF_RESKEY_vm", "web1")
    monkeypatch.setenv("OCF_RESKEY_homes", f"{agent.node_name()}=/srv/vmr")
    monkeypatch.setenv("OCF_RESKEY_stop_mode", "hibernate")
    assert agent.main(["vm", "validate-all"]) == agent.OCF_ERR_CONFIGURED
    monkeypatch.setenv("OCF_RESKEY_stop_mode", "save")
    assert agent.main(["vm", "validate-all"]) == agent.OCF_SUCCESS
    monkeypatch.setenv("OCF_RESKEY_homes", "some-other-node=/srv/vmr")
    assert agent.main(["vm", "validate-all"]) == agent.OCF_ERR_CONFIGURED


def test_setup_writes_a_corosync_conf_and_a_cib_pacemaker_accepts(tmp_path):
    p = _cli("cluster", "setup", "n1=10.0.0.1", "n2=10.0.0.2", "--witness", "10.0.0.9",
             "--fence-agent", "fence_ipmilan", "--fence-option", "ip=10.0.1.1",
             "--write", str(tmp_path))
    assert p.returncode == 0, p.stderr
    conf = (tmp_path / "corosync.conf").read_text()
    assert "wait_for_all: 1" in conf and "host: 10.0.0.9" in conf
    cib = (tmp_path / "cib.xml").read_text()
    root = ET.fromstring(cib)
    assert {x.get("id") for x in root.iter("primitive")} == {"fence-n1", "fence-n2"}
    assert root.find(".//nvpair[@name='stonith-enabled']").get("value") == "true"
    # Pacemaker's own checker accepts it (the lab boots real clusters from the same code).
    v = subprocess.run(["crm_verify", "--xml-file", str(tmp_path / "cib.xml")],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    p = _cli("cluster", "setup", "n1=10.0.0.1", "n2=10.0.0.2", "--fence-agent", "fence_x",
             "--fence-option", "nonsense")
    assert p.returncode == 2 and "KEY=VALUE" in p.stderr
