"""Replica storage: per replicated disk a qcow2 chain ``L0 ← L1 ← … ← head``.

    <storage>/<vm>/<disk>/layer-000000.qcow2   the base (the initial copy goes here)
    <storage>/<vm>/<disk>/layer-NNNNNN.qcow2   one layer per recovery point, then the head
    <storage>/<vm>/<disk>/test.qcow2           a test failover's overlay (thrown away)

A chain is a list of paths kept in the state store (its base may lie elsewhere: after a
reverse, the old primary's own disk is the base of its chain). Every operation here
works on closed images with qemu-img; the caller holds the VM's lock and has closed the
head server. Frozen layers are never written again, except when retention commits a
point's successor into the base — which leaves every remaining point's bytes unchanged.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import Conflict, UsageError
from ..qemutools import img

_LAYER = re.compile(r"layer-(\d{6})\.qcow2$")


def vm_dir(storage: Path, vm: str) -> Path:
    return Path(storage) / vm


def create_chains(storage: Path, vm: str, disks: list[dict]) -> dict[str, list[str]]:
    """An empty base (= head) for every disk; returns {disk: [base]}."""
    root = vm_dir(storage, vm)
    if root.exists() and any(root.iterdir()):
        raise Conflict(f"replica storage {root} already exists and is not empty",
                       hint="remove the stale replica first (`vmreplica remove VM` on the replica) "
                            "or choose another storage directory")
    chains = {}
    try:
        for d in disks:
            size = int(d["virtual_size"])
            if size <= 0:
                raise UsageError(f"disk {d['name']} has no size")
            ddir = root / d["name"]
            ddir.mkdir(parents=True, exist_ok=True)
            head = ddir / "layer-000000.qcow2"
            img.create(head, size, "qcow2")
            chains[d["name"]] = [str(head)]
    except Exception:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return chains


def new_chain(storage: Path, vm: str, disk: dict, depth: int) -> list[str]:
    """An empty chain of ``depth`` layers for a disk that joins later."""
    ddir = vm_dir(storage, vm) / disk["name"]
    ddir.mkdir(parents=True, exist_ok=True)
    chain: list[str] = []
    for i in range(depth):
        p = ddir / f"layer-{i:06d}.qcow2"
        p.unlink(missing_ok=True)
        if chain:
            img.create(p, None, "qcow2", backing=chain[-1])
        else:
            img.create(p, int(disk["virtual_size"]), "qcow2")
        chain.append(str(p))
    return chain


def resize_head(head: str, size: int) -> int | None:
    """The head of a chain to ``size`` bytes (its disk on the primary grew or shrank):
    its old size, or None when it had that size already. The frozen layers below keep
    theirs (their points had it): the head reads zeros beyond them."""
    old = int(img.info(head)["virtual-size"])
    if old == int(size):
        return None
    img.resize(head, size)
    img.sync_files(head)
    return old


def drop_disk_dir(storage: Path, vm: str, disk: str) -> None:
    """The folder of a disk no longer replicated, once its layers are dropped (nothing of
    it is left behind; a folder that still holds something else stays)."""
    try:
        (vm_dir(storage, vm) / disk).rmdir()
    except OSError:
        pass        # (gone already; or not empty: a file that is not one of its layers)


def delete_chains(storage: Path, vm: str) -> None:
    shutil.rmtree(vm_dir(storage, vm), ignore_errors=True)


def heads(chains: dict[str, list[str]], disks: list[str]) -> list[str]:
    return [chains[d][-1] for d in disks]


def _next_layer(storage: Path, vm: str, disk: str) -> Path:
    ddir = vm_dir(storage, vm) / disk
    ddir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in ddir.iterdir() if (m := _LAYER.search(p.name))]
    return ddir / f"layer-{max(numbers, default=-1) + 1:06d}.qcow2"


def freeze(storage: Path, vm: str, chains: dict[str, list[str]]) -> dict[str, list[str]]:
    """Freeze every head (it becomes a point's top layer) under a new, empty head."""
    out = {}
    made = []
    try:
        for disk, chain in chains.items():
            new = _next_layer(storage, vm, disk)
            size = int(img.info(chain[-1])["virtual-size"])   # -U: works while it is open
            img.create(new, size, "qcow2", backing=chain[-1])
            made.append(new)
            out[disk] = chain + [str(new)]
        # The caller records the new layers in the state store next: they must be on the
        # disk first, names included (qemu-img flushes the file as it closes it).
        img.sync_files(*made)
        img.sync_dirs(*(p.parent for p in made))
    except Exception:
        for p in made:
            p.unlink(missing_ok=True)
        raise
    return out


def merge_oldest(chains: dict[str, list[str]]) -> dict[str, list[str]]:
    """Retention: commit L1 into L0, put L2 (if any) on L0, delete L1.

    Safe to run again after a crash at any step: committing L1 into L0 twice writes the
    same bytes, and the view through L2 is the same whether it sits on L1 or on L0.
    """
    out = {}
    for disk, chain in chains.items():
        if len(chain) < 2:
            out[disk] = list(chain)
            continue
        base, top = chain[0], chain[1]
        if Path(top).exists():
            img.commit(top, base)
        if len(chain) > 2:
            img.rebase_unsafe(chain[2], base)
        Path(top).unlink(missing_ok=True)
        out[disk] = [base] + chain[2:]
    return out


def overlay(path: Path, backing: str) -> str:
    """A new writable overlay on ``backing`` (test failover, failover), O(1) in disk size."""
    path = Path(path)
    path.unlink(missing_ok=True)
    img.create(path, None, "qcow2", backing=backing)
    return str(path)


def drop_layers(paths: list[str]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def layer_size(path: str) -> int:
    """Bytes of data the layer holds (its own allocated data clusters, as `qemu-img map`
    says: not the file's size, which counts metadata and freed clusters too)."""
    try:
        return img.own_data(path)
    except Exception:  # noqa: BLE001 — a listing must not fail over a size
        return 0


def reset_heads(head_paths: list[str]) -> None:
    """Empty each head (same size, same backing) before an initial copy is applied to it."""
    for head in head_paths:
        meta = img.info(head)
        backing = meta.get("full-backing-filename") or meta.get("backing-filename")
        tmp = Path(head).with_suffix(".reset")
        img.create(tmp, int(meta["virtual-size"]), "qcow2", backing=backing)
        Path(tmp).replace(head)
