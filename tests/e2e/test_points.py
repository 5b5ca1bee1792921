"""Recovery points: immutable once made, retention keeps N, app-consistent points fall
back to crash-consistent (with an event) when no guest agent answers."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import qemu_io

pytestmark = pytest.mark.e2e


def _digest(image: str) -> str:
    with tempfile.NamedTemporaryFile() as tmp:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, tmp.name], check=True)
        return hashlib.sha256(Path(tmp.name).read_bytes()).hexdigest()


def test_points_never_change_and_retention_keeps_n(sites, vm_name):
    a, b = sites
    a.run("vm", "create", vm_name, "--disk", "32M")
    disk = a.vm(vm_name)["disks"][0]["path"]
    a.run("enable", vm_name, "--replica", b.address, "--recovery-history", "2",
          "--point-interval", "1s", "--app-consistent-every", "1")
    qemu_io(disk, "write -P 1 0 1M")
    a.run("initial", vm_name)
    first = [p for p in b.json("points", vm_name) if p["id"] != "latest"][0]
    before = _digest(first["paths"]["disk0"])
    seen_ids = {first["id"]}
    for i in range(2, 5):
        time.sleep(1.1)
        qemu_io(disk, f"write -P {i} 0 512k", f"write -P {i} {i}M 64k")
        a.run("sync", vm_name)
        pts = [p for p in b.json("points", vm_name) if p["id"] != "latest"]
        assert len(pts) <= 2
        seen_ids |= {p["id"] for p in pts}
        for p in pts:
            if p["id"] == first["id"]:
                assert _digest(p["paths"]["disk0"]) == before   # unchanged by later cycles
    assert len(seen_ids) == 4 and first["id"] not in {p["id"] for p in pts}  # merged away
    # The surviving points still hold exactly what the primary had at their time: the
    # newest one equals the primary's disk now (nothing written since the last cycle).
    newest = pts[-1]
    assert _digest(newest["paths"]["disk0"]) == _digest(disk)
    # The VM is off and has no guest agent: app-consistent points fell back, with events.
    assert {p["kind"] for p in pts} == {"crash"}
    events = a.json("events", vm_name)
    assert any("crash-consistent" in e["message"] for e in events)
    a.run("remove", vm_name)
