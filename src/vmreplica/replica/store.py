"""Replica storage: one qcow2 chain per replicated disk.

    <storage>/<vm>/<disk>/layer-000000.qcow2   (base)  ←  ...  ←  head

Today a chain has one layer (its head); recovery points (frozen layers under the head)
are added on top of this layout. Cycles are applied into the head only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import Conflict, UsageError
from ..qemutools import img


def vm_dir(storage: Path, vm: str) -> Path:
    return Path(storage) / vm


def create_chains(storage: Path, vm: str, disks: list[dict]) -> dict[str, str]:
    """Create an empty head for every disk; returns {disk: head path}."""
    root = vm_dir(storage, vm)
    if root.exists() and any(root.iterdir()):
        raise Conflict(f"replica storage {root} already exists and is not empty",
                       hint="remove the stale replica first (`vmreplica remove VM` on the replica) "
                            "or choose another storage directory")
    heads = {}
    try:
        for d in disks:
            size = int(d["virtual_size"])
            if size <= 0:
                raise UsageError(f"disk {d['name']} has no size")
            ddir = root / d["name"]
            ddir.mkdir(parents=True, exist_ok=True)
            head = ddir / "layer-000000.qcow2"
            img.create(head, size, fmt="qcow2")
            heads[d["name"]] = str(head)
    except Exception:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return heads


def delete_chains(storage: Path, vm: str) -> None:
    shutil.rmtree(vm_dir(storage, vm), ignore_errors=True)


def reset_heads(heads: list[str]) -> None:
    """Empty each head (same size, same backing) before an initial copy is applied to it."""
    for head in heads:
        meta = img.info(head)
        backing = meta.get("full-backing-filename") or meta.get("backing-filename")
        tmp = Path(head).with_suffix(".reset")
        img.create(tmp, int(meta["virtual-size"]), "qcow2", backing=backing)
        Path(tmp).replace(head)
