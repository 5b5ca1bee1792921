"""The running host: its home, state store, identity, hypervisor driver and locks.

One `Host` lives in the daemon; the primary and replica layers receive it as their
context (they use its attributes, they never import the service package).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Self

from ..errors import NotTrusted, UsageError
from ..transport import tls
from ..transport.client import PeerClient
from .home import Home, parse_address
from .store import Store

if TYPE_CHECKING:
    import ssl

    from ..hypervisor.base import Driver


class Host:
    def __init__(self, home: Home):
        home.require()
        self.home = home
        self.store = Store(home.db)
        self.name: str = self.store.get_setting("name")
        self.listen: str = self.store.get_setting("listen")
        self.cert_pem = home.cert.read_text()
        self.fingerprint = tls.fingerprint_pem(self.cert_pem)
        self._driver: Driver | None = None
        self._locks: dict[str, VMLock] = {}
        self.unsynced: dict = {}   # lock key → cycles acknowledged, not yet checkpointed
        self.unapplied: set[str] = set()  # lock keys of VMs with a staged cycle not applied
        self._locks_guard = threading.Lock()
        self._tls_ctx: ssl.SSLContext | None = None
        self._tls_peers_key: tuple | None = None
        self.stopping = threading.Event()
        from .activity import Activity
        self.activity = Activity()   # what runs now (cycles, probes): for progress
        from ..replica.heads import HeadServers
        self.heads = HeadServers(home.run)
        from ..replica.applies import Applies
        self.applies = Applies()    # acknowledged cycles being applied (views wait for them)
        self.mirror_targets: dict = {}     # vm → replica.mirror.MirrorTarget
        from ..primary.continuous import Continuous
        self.continuous = Continuous(self)

    # -- parts chosen by name from configuration -------------------------------------
    @property
    def driver(self):
        if self._driver is None:
            from ..hypervisor.factory import get_driver
            config = {"accel": self.store.get_setting("accel", "auto"),
                      "libvirt_uri": self.store.get_setting("libvirt_uri"),
                      "host_name": self.name}
            self._driver = get_driver(self.store.get_setting("driver", "qemu"), self.home.root,
                                      config)
        return self._driver

    def tracker(self, name: str = "bitmap"):
        from ..tracking.factory import get_tracker
        return get_tracker(name)

    def lock_key(self, vm: str) -> str:
        from ..domain.links import vm_name
        return vm_name(vm)

    def vm_lock(self, vm: str) -> VMLock:
        """The lock of a VM, shared by all its relationships (keys NAME and NAME@dr): one
        operation at a time on its QEMU, its bitmaps and its replica's chains."""
        key = self.lock_key(vm)
        with self._locks_guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = VMLock(self, key)
            return lock

    # -- TLS -------------------------------------------------------------------------
    def server_context(self):
        """A server context trusting exactly the pinned peers (rebuilt when they change)."""
        peers = self.store.peers()
        key = tuple(sorted(p["fingerprint"] for p in peers))
        if self._tls_ctx is None or key != self._tls_peers_key:
            self._tls_ctx = tls.server_context(self.home.cert, self.home.key,
                                               [p["cert_pem"] for p in peers])
            self._tls_peers_key = key
        return self._tls_ctx

    def client_for_address(self, address: str, timeout: float = 60.0) -> PeerClient:
        host, port = parse_address(address)
        peer = self.store.peer_by_address(f"{host}:{port}")
        if peer is None:
            raise NotTrusted(f"this host is not paired with {host}:{port}",
                             hint=f"on {host}:{port} run `vmreplica trust token`, then here "
                                  f"`vmreplica trust pair {host}:{port} TOKEN`")
        return self.client_for_peer(peer, timeout)

    def client_for_peer(self, peer: dict | str, timeout: float = 60.0) -> PeerClient:
        if isinstance(peer, str):
            found = self.store.peer(peer)
            if found is None:
                raise NotTrusted(f"no paired host named {peer!r}",
                                 hint="pair the hosts with `vmreplica trust token` / `trust pair`")
            peer = found
        if not peer.get("address"):
            raise UsageError(f"no address is known for peer {peer['name']}")
        host, port = parse_address(peer["address"])
        return PeerClient(host, port, self.home.cert, self.home.key, peer["cert_pem"],
                          peer["fingerprint"], peer_name=peer["name"], timeout=timeout)

    def event(self, kind: str, message: str, vm: str | None = None) -> None:
        self.store.add_event(kind, message, vm)

    def close_idle_parts(self) -> None:
        """What the driver keeps between block sessions, once idle (the scheduler asks)."""
        if self._driver is not None:
            self._driver.close_idle()

    def close(self) -> None:
        from ..replica import checkpoint
        from ..replica.mirror import close_target
        self.applies.wait_all()     # (what is cut short is staged: redone at the next start)
        checkpoint.settle_all(self)
        for vm in list(self.mirror_targets):
            close_target(self, vm, keep_open_flag=True)   # reopened at the next start
        self.heads.close_all()
        if self._driver is not None:
            self._driver.close_kept()
        self.store.close()


class VMLock:
    """A VM's re-entrant lock. Whoever takes it (not again, from within) first finishes
    the checkpoint of the VM's acknowledged cycles (replica.checkpoint), so that no
    operation on the VM (the next cycle, a recovery point, a failover, a removal) starts
    while a crash would still re-apply a cycle over what it does; then applies again,
    whole, any staged cycle whose apply or checkpoint failed (replica.unapplied), so that
    nothing reads a head holding part of a cycle. If that fails the lock is not taken:
    the taker gets the reason. ``whole=False`` (removal, an initial copy or resync that
    rewrites the heads) takes it without the redo."""

    def __init__(self, host: Host, key: str):
        self._host, self._key = host, key
        self._lock = threading.RLock()
        self._depth = 0          # changed only by the thread that holds the lock

    def acquire(self, blocking: bool = True, timeout: float = -1, whole: bool = True) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        self._depth += 1
        if self._depth == 1:
            try:
                self._settle(whole)
            except BaseException:
                self.release()
                raise
        return True

    def _settle(self, whole: bool) -> None:
        host, key = self._host, self._key
        if host.unsynced.get(key):
            from ..replica import checkpoint
            checkpoint.settle(host, key)
        if whole and key in host.unapplied:
            from ..replica import recovery, unapplied
            try:
                recovery.redo_unapplied(host, key)
            except Exception as e:  # noqa: BLE001 — the reason goes to the taker
                raise unapplied.refusal(host, key, e) from None

    def release(self) -> None:
        self._depth -= 1
        self._lock.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def as_is(self) -> _AsIs:
        """``with host.vm_lock(vm).as_is():`` the lock, without applying the VM's
        unapplied staged cycles first (see the class)."""
        return _AsIs(self)


class _AsIs:
    def __init__(self, lock: VMLock):
        self._lock = lock

    def __enter__(self) -> VMLock:
        self._lock.acquire(whole=False)
        return self._lock

    def __exit__(self, *exc) -> None:
        self._lock.release()


def staging_dir(host: Host, vm: str) -> Path:
    d = host.home.staging / vm
    d.mkdir(parents=True, exist_ok=True)
    return d
