"""The qemu driver's QEMU command line, built from a VM's description (vm.json), and
reading what QEMU said: its log (``-D HOME/vms/NAME/qemu.log``: daemonized, its stderr
goes to /dev/null) and its error lines. No process is started here.

A failed-over VM's disk whose chain is to be collapsed live (``collapse_base``, see
collapse.py) is opened with its base as the node named after the disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ...errors import HypervisorError
from ...qemutools import img
from ..guest import guest_files

log = logging.getLogger("vmreplica.qemu")

QEMU = "qemu-system-x86_64"
ISOLATED_MAC = "52:54:00:12:34:56"     # the isolated NIC's MAC (QEMU's own default, named)


def command(desc: dict, accel: str, rt: Callable[[str], Path], vmdir: Path) -> list[str]:
    """The command line of VM ``desc``'s QEMU: accelerator ``accel``, its runtime files
    ``rt(ext)``, its folder ``vmdir`` (console and QEMU's log)."""
    args = [QEMU, "-name", f"{desc['name']},process=vmreplica-{desc['name']}",
            "-uuid", desc["uuid"], "-machine", f"pc,accel={accel}", "-m", str(desc["memory_mb"]),
            "-smp", "1", "-nodefaults", "-display", "none", "-no-user-config",
            "-daemonize", "-pidfile", str(rt("pid")),
            # Daemonized, QEMU's stderr goes to /dev/null unless -D names a log: an
            # abort's last words (a failed assertion, glibc's heap checks) land here.
            "-D", str(vmdir / "qemu.log"),
            "-chardev", f"socket,id=qmp,path={rt('qmp')},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            # A second monitor for the continuous-mode watchdog (out-of-band capable).
            "-chardev", f"socket,id=qmp2,path={rt('qmp2')},server=on,wait=off",
            "-mon", "chardev=qmp2,mode=control",
            # A third for the cluster's VM checker, so a check never waits for a cycle.
            "-chardev", f"socket,id=qmpc,path={rt('qmpc')},server=on,wait=off",
            "-mon", "chardev=qmpc,mode=control",
            "-serial", f"file:{vmdir / 'console.log'}"]
    if desc.get("network") == "isolated":
        # User-mode networking with restrict=on: a NIC that reaches nothing outside.
        args += ["-nic", f"user,model=virtio-net-pci,restrict=on,mac={ISOLATED_MAC}"]
    else:
        args += ["-nic", "none"]
    if accel == "kvm":
        args += ["-cpu", "host"]
    if desc.get("guest"):
        files = guest_files(desc["guest"])
        args += ["-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]),
                 "-append", files["cmdline"], "-no-reboot"]
    if desc.get("agent"):
        args += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=qga0,path={rt('qga')},server=on,wait=off",
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
    for d in desc["disks"]:
        node = d["name"]
        chained = _collapsible_chain(d)     # a failed-over VM (see collapse_prepare)
        if chained is not None:
            args += chained + ["-device", f"virtio-blk-pci,drive={node}-top,id=vd-{node},"
                                          f"serial={node}"
                               + (",share-rw=on" if desc.get("share_rw") else "")]
            continue
        args += ["-blockdev", json.dumps({"driver": "file", "filename": d["path"],
                                          "node-name": f"{node}-file", "discard": "unmap"}),
                 "-blockdev", json.dumps({"driver": d["format"], "file": f"{node}-file",
                                          "node-name": node, "discard": "unmap"}),
                 "-device", f"virtio-blk-pci,drive={node},id=vd-{node},serial={node}"
                 + (",share-rw=on" if desc.get("share_rw") else "")]
    return args


def _collapsible_chain(d: dict) -> list[str] | None:
    """-blockdev arguments opening disk ``d``'s chain with its base as node DISK (see
    collapse.CollapsePart.collapse_prepare), or None: the disk is opened as usual."""
    base = d.get("collapse_base")
    if not base or d.get("format") != "qcow2":
        return None
    try:
        chain = img.info(d["path"], backing_chain=True)
    except HypervisorError as e:
        log.warning("%s: cannot read its chain (%s): opened as usual", d["path"], e)
        return None
    chain = chain if isinstance(chain, list) else [chain]
    if len(chain) < 2 or chain[-1]["filename"] != base:
        return None
    node, args, below = d["name"], [], None
    for i, layer in enumerate(reversed(chain)):          # the base first
        top = i == len(chain) - 1
        name = node if i == 0 else f"{node}-top" if top else f"{node}-c{i}"
        spec = {"driver": layer.get("format") or "qcow2", "node-name": name, "discard": "unmap",
                "file": {"driver": "file", "filename": layer["filename"],
                         "node-name": f"{name}-file", "discard": "unmap"}}
        if not top:
            spec["read-only"] = True                      # frozen layers, as when implicit
        if below is not None:
            spec["backing"] = below
        args += ["-blockdev", json.dumps(spec)]
        below = name
    return args


def read_from(path: Path, offset: int) -> str:
    """What a log file gained after ``offset`` (at most its last 64 KiB)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:       # emptied and written again meanwhile
                offset = 0
            f.seek(max(offset, size - 65536))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def written_since(path: Path, since: float) -> str:
    """A log QEMU (re)wrote since ``since`` (its last 64 KiB), else ""."""
    try:
        if path.stat().st_mtime < since - 1.0:     # coarse timestamps
            return ""
    except OSError:
        return ""
    return read_from(path, 0)


def qemu_error(text: str, keep: int = 3) -> str:
    """The last meaningful lines of QEMU's own error output, joined: its messages
    ("qemu-system-x86_64: ...: reason") without the program name, blank lines and
    repeats dropped; the lines of the last message block only."""
    prog = QEMU + ":"
    lines = []
    for ln in (text or "").splitlines():
        ln = ln.strip()
        if ln.startswith(prog):
            ln = ln[len(prog):].strip()
        if ln and ln not in lines:
            lines.append(ln)
    return "; ".join(lines[-keep:])
