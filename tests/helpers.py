"""Helpers for tests: qemu-io writes, image comparison, replica pairs."""

from __future__ import annotations

import subprocess

from vmreplica import lab


def qemu_io(path, *commands: str, force_share: bool = False) -> str:
    args = ["qemu-io", "-f", "qcow2"] + (["-U"] if force_share else [])
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run(args + [str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


def images_identical(a, b) -> tuple[bool, str]:
    proc = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                          text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def replicated_pairs(primary: lab.LabHost, replica: lab.LabHost, vm: str):
    """[(primary disk path, replica head path)] of a replicated VM."""
    p = {d["name"]: d["path"] for d in primary.vm(vm)["disks"]}
    r = {d["name"]: d["path"] for d in replica.vm(vm)["disks"]}
    return [(p[n], r[n]) for n in r]


def assert_replica_equals(primary, replica, vm):
    for src, head in replicated_pairs(primary, replica, vm):
        same, msg = images_identical(src, head)
        assert same, f"{src} != {head}: {msg}"
