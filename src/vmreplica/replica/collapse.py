"""A failed-over VM ends on plain disks of its own: its chain (failover overlay → the
replica's layers → base) is merged into the base, live, and the replica's storage of it
goes.

1. ``relocate_bases`` — at failover start, the VM off: each disk's base, when it lies
   in the replica storage (``STORAGE/VM/DISK/layer-000000.qcow2``, the initial copy),
   moves into the VM's own folder (``HOME/vms/VM/DISK.qcow2``; a hard link, then the
   layer above is rebased on it without moving data, the row changed, the old name
   dropped: a crash at any step leaves a chain that reads the same). After a reverse the
   base is already the VM's own disk (the old primary's). O(1) in the disk size; on
   another filesystem the base is copied once. The VM is started with its base as the
   node named after the disk (the driver's ``collapse_prepare``), so that after the
   merge change tracking finds the node it addresses.
2. ``begin`` — when the failover is committed (a planned one at once, an unplanned one
   at ``--complete``): the intent is recorded (``collapse`` in the row) and the points
   go (their layers are to be merged into the base), in one transaction.
3. ``ensure``/``run`` — the first step of ``reverse`` (so of every failback) and of
   ``remove``, under the VM's lock, before reverse puts its first tracking bitmap on a
   node (nothing else opens the chain meanwhile: the head server and the mirror target
   were closed at failover): the VM running, an active block-commit of each disk's chain
   into its base (QEMU's ``block-commit``, libvirt's virDomainBlockCommit), pivoted when
   ready, so the VM runs on the base; the VM off, ``qemu-img commit`` into the base.
   Then the row's chains become ``[base]`` and ``STORAGE/VM`` is deleted. It costs the
   layers above the base (what changed since the initial copy or the last reverse),
   never the whole disk. Events say when it starts and when it is done.

It runs in the operation that needs it, not on a thread of its own: a merge racing a
reverse that starts tracking on the overlay would lose its bitmaps with the overlay.
A daemon that dies mid-merge leaves the job to QEMU (its block jobs are crash safe: the
guest reads the same data through the chain until the pivot, and a commit merged twice
writes the same bytes); the intent stays in the row, and the next ``reverse`` or
``remove`` takes the job over (running or ready: it completes it), starts it again
offline if QEMU died too, or only finishes the bookkeeping if the pivot had happened.
A failed-over VM that is never reversed keeps running on its chain until then.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import Conflict, HypervisorError
from ..qemutools import img
from . import store as rstore

log = logging.getLogger("vmreplica.replica")


def _inside(path: str, folder: Path) -> bool:
    p = Path(path)
    return p == folder or folder in p.parents


# -- 1. at failover start ------------------------------------------------------------
def relocate_bases(host, vm: str) -> dict[str, str]:
    """Move each disk's base out of the replica storage into the VM's folder (the VM is
    off, the heads closed, the VM's lock held). Returns {disk: base}."""
    rel = host.store.relationship(vm)
    root = rstore.vm_dir(Path(rel.storage), vm)
    folder = Path(host.home.vms) / vm
    chains = {d: list(c) for d, c in rel.chains.items()}
    for disk, chain in chains.items():
        old = chain[0]
        if not _inside(old, root):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        new = folder / f"{disk}.qcow2"
        if new.exists() and not new.samefile(old):
            new = folder / f"{disk}-{int(time.time())}.qcow2"
        if not new.exists():
            try:
                os.link(old, new)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", old, str(new)],
                               check=True, capture_output=True)   # another filesystem
        img.sync_dirs(folder)
        if len(chain) > 1:
            img.rebase_unsafe(chain[1], new)     # the same bytes under another name
            img.sync_files(chain[1])
        chain[0] = str(new)
        host.store.update_relationship(vm, chains=chains)
        Path(old).unlink(missing_ok=True)
    return {d: c[0] for d, c in chains.items()}


# -- 2. at commit --------------------------------------------------------------------
def begin(host, vm: str, chains: dict[str, list[str]]) -> dict:
    """The row changes of a committed failover (the caller writes them in its
    transaction): the collapse intent, and no points (the base is about to change)."""
    return {"collapse": {"bases": {d: c[0] for d, c in chains.items()}, "at": time.time()}}


def pending(host, vm: str) -> bool:
    rel = host.store.relationship(vm)
    return bool(rel and rel.collapse)


def ensure(host, vm: str) -> None:
    """Before reverse or remove: the collapse of ``vm`` is done (run here when the row
    still has the intent). Raises what stops it."""
    if pending(host, vm):
        run(host, vm)


# -- 3. the merge ----------------------------------------------------------------------
def run(host, vm: str) -> dict | None:
    """Merge the chains of ``vm`` into their bases (live or offline), then drop its
    replica storage. Holds the VM's lock: `reverse` and `remove` wait for it."""
    t0 = time.monotonic()
    with host.vm_lock(vm).as_is():
        rel = host.store.relationship(vm)
        if not rel or not rel.collapse:
            return None
        bases = dict(rel.collapse["bases"])
        tops = {d: c[-1] for d, c in rel.chains.items()}
        above = sum(rstore.layer_size(p) for c in rel.chains.values() for p in c[1:])
        host.event("failover", f"collapsing the disks of {vm} into plain disks of its own "
                               f"({_mib(above)} MiB in the layers above their bases)", vm)
        copied, how = {}, "offline"
        for _ in range(3):                      # the VM may stop under a live job: offline
            if host.driver.inspect(vm).state == "running":
                try:
                    copied = host.driver.collapse_live(vm, bases)
                    how = "live"
                    break
                except Conflict:
                    continue
            for d, base in bases.items():
                if tops[d] != base and Path(tops[d]).exists():
                    img.commit(tops[d], base)    # the whole chain above the base
            host.driver.set_disks(vm, bases)
            break
        else:
            raise HypervisorError(f"the disks of {vm} could not be collapsed: the VM kept "
                                  "stopping and starting")
        img.sync_files(*bases.values())
        host.driver.collapse_done(vm, bases)
        storage = rstore.vm_dir(Path(rel.storage), vm)
        host.store.update_relationship(vm, chains={d: [b] for d, b in bases.items()},
                                       collapse=None)
        shutil.rmtree(storage, ignore_errors=True)
    seconds = time.monotonic() - t0
    host.event("failover", f"disks of {vm} collapsed ({how}, {seconds:.1f} s, "
                           f"{_mib(sum(copied.values()) or above)} MiB merged): it runs on "
                           f"{', '.join(sorted(bases.values()))}; its replica layers are "
                           "deleted", vm)
    return {"how": how, "seconds": seconds, "bases": bases}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"
