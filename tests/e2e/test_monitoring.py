"""Watching replication as an operator does: the replica daemon stops, and on the
primary the VM's health turns warning after the first scheduled cycle that fails, then
critical after the second, with the unreachable replica named; each change is an event;
the replica comes back and health returns to normal by itself. Prometheus `/metrics`
parses with prometheus-client's own parser and carries one series per relationship."""

from __future__ import annotations

import ssl
import time
import urllib.request

import pytest

from harness import lab
from helpers import qemu_io

pytestmark = pytest.mark.e2e

FREQUENCY = 30          # the shortest schedule an operator can choose


def _metrics(host: lab.LabHost) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    port = int(host.address.rsplit(":", 1)[1]) + 1          # the web listener
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx,
                                timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, vm: str, **labels) -> float | None:
    fam = families.get(name)
    for s in fam.samples if fam else []:
        if s.labels.get("vm") == vm and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_health_through_a_replica_outage_and_metrics(fresh_dir, vm_name):
    a, b = lab.two_sites(fresh_dir)
    try:
        a.run("vm", "create", vm_name, "--disk", "32M")
        a.run("enable", vm_name, "--replica", b.address, "--frequency", f"{FREQUENCY}s")
        a.run("initial", vm_name)
        qemu_io(a.vm(vm_name)["disks"][0]["path"], "write -P 5 0 4M")
        a.run("sync", vm_name)
        assert a.json("status", vm_name)[0]["health"] == "normal"

        fams = _metrics(a)
        for name in ("vmreplica_lag_seconds", "vmreplica_state", "vmreplica_health",
                     "vmreplica_bytes_replicated_12h", "vmreplica_bytes_sent_12h",
                     "vmreplica_last_cycle_duration_seconds", "vmreplica_missed_cycles_12h",
                     "vmreplica_failed_cycles_12h", "vmreplica_epoch", "vmreplica_up"):
            assert name in fams, sorted(fams)
        assert _value(fams, "vmreplica_health", vm_name, role="primary", peer="site-b") == 0
        assert _value(fams, "vmreplica_state", vm_name, state="replicating") == 1
        assert _value(fams, "vmreplica_bytes_replicated_12h", vm_name) > 0
        assert _value(fams, "vmreplica_lag_seconds", vm_name) is not None
        assert _value(_metrics(b), "vmreplica_state", vm_name, role="replica",
                      state="replicating") == 1

        # The replica goes away: health follows the scheduled cycles, nobody runs `sync`.
        b.stop()
        t0 = time.monotonic()
        seen: list[tuple[float, str, list[str]]] = []
        while True:
            st = a.json("status", vm_name)[0]
            if not seen or seen[-1][1] != st["health"]:
                seen.append((time.monotonic() - t0, st["health"], st["reasons"]))
            if st["health"] == "critical":
                break
            assert time.monotonic() - t0 < 2 * FREQUENCY + 20, seen
            time.sleep(0.5)
        levels = [lvl for _, lvl, _ in seen]
        assert levels == ["normal", "warning", "critical"], seen
        assert any("site-b" in r for r in seen[-1][2]), seen      # names the replica
        print(f"replica stopped: {seen}")
        assert _value(_metrics(a), "vmreplica_health", vm_name) == 2

        b.start()
        deadline = time.monotonic() + FREQUENCY + 30
        while a.json("status", vm_name)[0]["health"] != "normal":
            assert time.monotonic() < deadline, a.json("status", vm_name)
            time.sleep(0.5)

        def changes():
            return [e["message"] for e in a.json("events", vm_name) if e["kind"] == "health"]
        deadline = time.monotonic() + 10         # health is evaluated once a second
        while not any("critical → normal" in m for m in changes()):
            assert time.monotonic() < deadline, changes()
            time.sleep(0.25)
        assert any("normal → warning" in m for m in changes()), changes()
        assert any("warning → critical" in m for m in changes()), changes()
        assert _value(_metrics(a), "vmreplica_health", vm_name) == 0
        assert _value(_metrics(a), "vmreplica_failed_cycles_12h", vm_name) >= 2
    finally:
        lab.teardown(a, b)
