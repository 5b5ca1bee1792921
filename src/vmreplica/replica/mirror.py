"""Continuous mode, replica side: the mirror target. One qemu-storage-daemon exports the
heads of a VM's chains over NBD on TCP with TLS (mutual, against the pinned primary),
writing through (`writethrough`: the primary's active mirror never passes a guest flush
on, so every write must be durable before it is acknowledged). The primary's QEMU
writes every guest write here before the guest sees it acknowledged.

While the target is open, recovery points are taken live (`blockdev-snapshot` of every
head in one transaction: requests in flight complete first, later ones go to the new
heads) and retention merges layers with `block-commit` jobs, so the mirror never stops.
Each chain is opened with explicit node names (`d<disk>l<layer>`) for that.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from ..domain.relationship import Relationship
from ..errors import HypervisorError, OperationError
from ..qemutools.qsd import StorageDaemon
from ..transport import tls

log = logging.getLogger("vmreplica.replica")

# Every node of a head passes discards on (QEMU's default is `ignore`): an NBD TRIM from
# the mirror is then applied to the head, where qcow2 (v3, a backing file below) makes
# the clusters read as zeroes instead of the older layer's data; with `ignore` the head
# kept showing what the layer below holds, a silent divergence from the primary.
DISCARD = {"discard": "unmap"}


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MirrorTarget:
    def __init__(self, host, rel: Relationship, peer: dict, port: int):
        self.vm = rel.vm
        self.disks = list(rel.disks)
        self.chains = {d: list(rel.chains[d]) for d in self.disks}
        self.nodes: dict[str, list[str]] = {}
        self._serial = 0
        self.bind = host.listen.rsplit(":", 1)[0]
        self.port = port
        name = f"mt-{rel.id[:8]}"
        creds = tls.creds_dir(host, peer, "server", name)
        blockdevs: list[dict] = []
        for disk in self.disks:
            self.nodes[disk] = []
            for k, path in enumerate(self.chains[disk]):
                node = self._new_node()
                # Each layer on the one below; the base on its own backing file, if it
                # has one: an operator's existing domain whose disk is an overlay (its
                # image, the base of the chain on the domain's own host after a reverse).
                # Cut off from it, the head read zeros where that file holds the data, and
                # a write into a cluster the disk does not hold yet filled the rest of the
                # cluster with those zeros.
                below = {"backing": self.nodes[disk][-1]} if k else {}
                blockdevs += [{"driver": "file", "filename": path, "node-name": f"{node}f",
                               **DISCARD},
                              {"driver": "qcow2", "file": f"{node}f", "node-name": node,
                               "read-only": k < len(self.chains[disk]) - 1,
                               **below, **DISCARD}]
                self.nodes[disk].append(node)
        exports = [{"type": "nbd", "id": f"e{i}", "node-name": self.nodes[disk][-1],
                    "name": disk, "writable": True, "writethrough": True}
                   for i, disk in enumerate(self.disks)]
        self.qsd = StorageDaemon(
            host.home.run, name, blockdevs, exports, nbd=False,
            objects=[f"tls-creds-x509,id=tls0,dir={creds},endpoint=server,verify-peer=on"],
            nbd_server=f"addr.type=inet,addr.host={self.bind},addr.port={port},tls-creds=tls0")
        self.qsd.start()

    def _new_node(self) -> str:
        self._serial += 1
        return f"n{self._serial}"

    def alive(self) -> bool:
        return self.qsd.proc is not None and self.qsd.proc.poll() is None

    def snapshot(self, new_heads: dict[str, str]) -> None:
        """Freeze every head live: the new (empty) files become the heads in one
        transaction (requests in flight finish first); the exports follow them."""
        q = self.qsd.qmp
        assert q is not None                        # (started)
        added = {}
        for disk in self.disks:
            node = self._new_node()
            q.execute("blockdev-add", {"driver": "qcow2", "node-name": node,
                                       "file": {"driver": "file", "filename": new_heads[disk],
                                                "node-name": f"{node}f", **DISCARD},
                                       "backing": None, **DISCARD})
            added[disk] = node
        q.execute("transaction", {"actions": [
            {"type": "blockdev-snapshot", "data": {"node": self.nodes[d][-1], "overlay": added[d]}}
            for d in self.disks]})
        for disk in self.disks:
            self.chains[disk].append(new_heads[disk])
            self.nodes[disk].append(added[disk])

    def merge_oldest(self, timeout: float = 600.0) -> None:
        """Retention, live: commit layer 1 into layer 0 with a block-commit job per disk;
        QEMU then puts layer 2 on layer 0 (and rewrites its backing file name)."""
        q = self.qsd.qmp
        assert q is not None                        # (started)
        jobs = []
        for disk in self.disks:
            if len(self.chains[disk]) < 3:
                raise OperationError("live retention needs a frozen layer above the base")
            job = f"commit-{self._new_node()}"
            q.execute("block-commit", {"job-id": job, "device": self.nodes[disk][-1],
                                       "top-node": self.nodes[disk][1],
                                       "base-node": self.nodes[disk][0], "auto-dismiss": True})
            jobs.append(job)
        deadline = time.monotonic() + timeout
        while jobs:
            ev = q.wait_event("BLOCK_JOB_COMPLETED", max(1.0, deadline - time.monotonic()),
                              match=lambda e: e["data"]["device"] in jobs)
            if ev["data"].get("error"):
                raise HypervisorError(f"merging a recovery point failed: {ev['data']['error']}")
            jobs.remove(ev["data"]["device"])
        for disk in self.disks:
            self.nodes[disk].pop(1)
            Path(self.chains[disk].pop(1)).unlink(missing_ok=True)

    def close(self) -> None:
        # Like a head server: no bitmaps, and the mirror writes through, so a quit that
        # hangs gets a bounded wait before the kill (it holds the VM's lock).
        from .heads import HEAD_QUIT_SECONDS
        self.qsd.close(timeout=HEAD_QUIT_SECONDS)


def open_target(host, peer: dict, vm: str) -> dict:
    """Export the heads for the primary's mirror (closing the head server first); the
    port is kept in the relationship so a restarted replica comes back where the primary's
    NBD client reconnects."""
    from .checks import own_relationship
    rel = own_relationship(host, peer, vm)
    if rel.state != "replicating":
        raise OperationError(f"{vm} cannot receive a mirror in state {rel.state}")
    with host.vm_lock(vm):
        target = host.mirror_targets.get(vm)
        if target is None or not target.alive():
            host.heads.close(vm)
            port = int(rel.mirror_port or free_port(host.listen.rsplit(":", 1)[0]))
            target = MirrorTarget(host, rel, peer, port)
            host.mirror_targets[vm] = target
        host.store.update_relationship(vm, mirror_port=target.port, mirror_open=True,
                                       index_valid=False)   # the mirror bypasses the index
    host.event("continuous", f"mirror target open on {target.bind}:{target.port}", vm)
    return {"vm": vm, "host": target.bind, "port": target.port, "tls_hostname": host.name,
            "exports": target.disks}


def close_target(host, vm: str, keep_open_flag: bool = False) -> bool:
    """Stop exporting the heads (a cycle arrives, failover, removal). Returns whether one
    was open."""
    target = host.mirror_targets.pop(vm, None)
    if target is None:
        return False
    try:
        target.close()
    except OperationError as e:
        log.warning("closing the mirror target of %s: %s", vm, e)
    if not keep_open_flag and host.store.relationship(vm) is not None:
        host.store.update_relationship(vm, mirror_open=False)
    return True


def revive_dead_targets(host) -> list[str]:
    """The replica's watchdog: a mirror target whose storage daemon died while this daemon
    runs (killed, crashed) is opened again on the same port, so the primary's mirror
    resumes within seconds. Without it the primary tried to resume against a closed port
    until it gave up (primary.mirror_steps.RESUME_TRIES, ~44 s of continuous mode without
    zero-loss protection, found by the fault soak). Returns the VMs revived."""
    revived = []
    for vm, target in list(host.mirror_targets.items()):
        if target.alive():
            continue
        rel = host.store.relationship(vm)
        close_target(host, vm, keep_open_flag=True)    # its leftover files go
        peer = host.store.peer(rel.peer) if rel is not None else None
        if peer is None or not rel.mirror_open or rel.state != "replicating":
            continue
        try:
            open_target(host, peer, vm)
        except Exception as e:  # noqa: BLE001 — the primary falls back to starting afresh
            log.warning("could not reopen the dead mirror target of %s: %s", vm, e)
            continue
        host.event("continuous", "the mirror target's storage daemon had died: opened again "
                                 "on the same port", vm)
        revived.append(vm)
    return revived


def reopen_targets(host) -> None:
    """Start-up: the mirror targets that were open when the daemon stopped or died."""
    for rel in host.store.relationships():
        if rel.role == "replica" and rel.mirror_open and rel.state == "replicating":
            peer = host.store.peer(rel.peer)
            if peer is None:
                continue
            try:
                open_target(host, peer, rel.vm)
            except Exception as e:  # noqa: BLE001 — the primary falls back to cycles
                log.warning("could not reopen the mirror target of %s: %s", rel.vm, e)
