"""What runs now (issue 17, item 3): the daemon's registry of running operations and the
lines the CLI draws from it."""

from __future__ import annotations

import threading
import time

from vmreplica.cli.render import progress_text, watch_line
from vmreplica.service.activity import Activity


class Counter:
    read_bytes = 0


def test_an_operation_reports_phase_then_bytes_rate_and_eta():
    reg = Activity()
    src = Counter()
    assert reg.of("web1") is None and reg.listing("web1") == []
    with reg.running("web1", "delta", "cycle") as op:
        op.label, op.phase = "cycle 7", "freezing the disks"
        now = reg.of("web1")
        assert (now["label"], now["phase"], now["kind"]) == ("cycle 7", "freezing the disks",
                                                              "delta")
        assert "done" not in now
        op.measure(src, "read_bytes", 512 << 20)
        src.read_bytes = 128 << 20
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and reg.of("web1").get("rate_bps") is None:
            time.sleep(0.1)                 # the rate needs half a second of measure
        now = reg.of("web1")
        assert (now["done"], now["total"], now["percent"]) == (128 << 20, 512 << 20, 25.0)
        assert now["rate_bps"] > 0
        assert now["eta_seconds"] == round((384 << 20) / now["rate_bps"], 1)
        assert [o["vm"] for o in reg.listing("web1")] == ["web1"]
        assert reg.listing("web2") == []
        with reg.running("web1@dr", "resync", "resync"):
            assert [o["vm"] for o in reg.listing("web1")] == ["web1", "web1@dr"]
            assert reg.of("web1")["label"] == "cycle 7"
    assert reg.of("web1") is None          # ended (whatever way): gone


def test_an_operation_that_fails_is_gone_too():
    reg = Activity()
    try:
        with reg.running("vm", "initial", "initial copy"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert reg.listing() == []


def test_progress_and_wait_lines():
    op = {"vm": "web1", "kind": "delta", "label": "cycle 3", "phase": "reading and shipping",
          "seconds": 4.0, "done": 256 << 20, "total": 512 << 20, "percent": 50.0,
          "rate_bps": 64 << 20, "eta_seconds": 4.0}
    text = progress_text(op)
    assert text.startswith("cycle 3: [############             ]  50.0 % ")
    assert text.endswith("(256.0 MiB of 512.0 MiB, 64.0 MiB/s, ETA 4 s)"), text
    assert progress_text({**op, "eta_seconds": 125.4}).endswith("ETA 2 min 05 s)")
    assert watch_line("sync of web1", op, ("delta",), "web1") == f"sync of web1: {text}"
    wait = watch_line("remove web1", op, (), "web1")
    assert wait.startswith("remove web1: waiting for the running cycle 3 of web1 to end "
                           "(50.0 %, running for "), wait
    starting = {**op, "phase": "freezing the disks"}
    for k in ("done", "total", "percent", "rate_bps", "eta_seconds"):
        starting.pop(k)
    assert progress_text(starting).startswith("cycle 3: freezing the disks (")
    probe = {"vm": None, "kind": "kvm-probe", "seconds": 3.0, "expected_seconds": 20.0,
             "label": "probing whether KVM can boot a guest here (once per machine, ~20 s)"}
    assert watch_line("start m1", probe, (), "m1").startswith(
        "probing whether KVM can boot a guest here (once per machine, ~20 s)… (")


def test_the_registry_is_safe_across_threads():
    reg = Activity()
    stop = threading.Event()

    def churn(i):
        while not stop.is_set():
            with reg.running(f"vm{i}", "delta", "cycle"):
                pass

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        for o in reg.listing():
            assert o["kind"] in ("delta", "kvm-probe")
    stop.set()
    for t in threads:
        t.join(5)
    assert [o for o in reg.listing() if o["vm"]] == []


def test_the_dashboard_shows_a_running_operation():
    from vmreplica.web.layout import running
    assert running(None) == ""
    html = running({"vm": "web1", "kind": "initial", "label": "initial copy",
                    "phase": "reading and shipping", "seconds": 2.0, "done": 1 << 30,
                    "total": 4 << 30, "percent": 25.0, "rate_bps": 100 << 20,
                    "eta_seconds": 30.7})
    assert '<progress max="100" value="25.0"></progress>' in html
    assert "initial copy: 25.0 % (1.0 GiB of 4.0 GiB, 100.0 MiB/s, ETA 30.7 s)" in html
    html = running({"vm": "web1", "kind": "resync", "label": "resync", "seconds": 2.0,
                    "phase": "site-b reads its copy for the block digests"})
    assert "resync: site-b reads its copy for the block digests" in html
    assert "<progress" not in html
