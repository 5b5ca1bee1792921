"""The replication API's routes (TCP + mutual TLS, for peer hosts): pairing, hello,
relationship creation and settings, cycles, seeding, the mirror target, the replica's
points, what each side asks the other of its state (before a failover, to know it still
is the primary), reverse, DR links, the cluster's views and handover, and removal; every
route but /v1/pair requires a pinned client certificate.
"""

from __future__ import annotations

from ... import __version__
from ...errors import Refused, UsageError
from ...hypervisor.base import Origin
from ...primary import relationship as prim
from ...replica import lifecycle, receiver, removal
from ...replica import points as rpoints
from ...replica import reverse as rreverse
from ...transport.http import Request, Router
from .. import trust
from .common import flag, settled


def _epoch(req: Request) -> int:
    """The ``epoch`` query parameter of a peer's request (0 if absent)."""
    text = req.query.get("epoch", "0")
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise UsageError(f"epoch must be a whole number, not {text[:40]!r}")
    return int(text)


def replication_routes(host) -> Router:
    r = Router()

    @r.route("POST", "/v1/pair")
    def pair(req):
        return trust.accept_pairing(host, req.json())

    @r.route("GET", "/v1/hello")
    def hello(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        from ...domain.patterns import find_authorization
        settings = host.store.get_setting("replica_server") or {}
        entry = find_authorization(host.store.authorizations(), peer["name"])
        return {"name": host.name, "version": __version__, "you": peer["name"],
                "replica_server": bool(settings.get("enabled")),
                "authorized": entry is not None}

    @r.route("POST", "/v1/replica/relationships")
    def create(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return lifecycle.create_relationship(host, peer, req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/cycles")
    def cycle(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        removal.refuse_if_removed(host, peer, req.params["vm"])
        # (a plain delta is acknowledged once staged, then applied: req.answer_now)
        return receiver.receive_cycle(host, peer, req.params["vm"], req.body(),
                                      acknowledge=req.answer_now)

    @r.route("POST", "/v1/replica/relationships/{vm}/adopt")
    def replica_adopt(req):
        from ...replica import seeding as rseeding
        peer = trust.require_peer(host, req.peer_fingerprint)
        return rseeding.adopt(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/disks")
    def replica_disks(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return lifecycle.change_disks(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/definition")
    def replica_definition(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return lifecycle.follow_definition(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/settings")
    def replica_settings(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return lifecycle.apply_settings(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/mirror")
    def replica_mirror(req):
        from ...replica import checks, mirror
        peer = trust.require_peer(host, req.peer_fingerprint)
        b = req.json()
        if b.get("action") == "close":
            with host.vm_lock(req.params["vm"]):
                checks.own_relationship(host, peer, req.params["vm"])
                return {"closed": mirror.close_target(host, req.params["vm"])}
        return mirror.open_target(host, peer, req.params["vm"])

    @r.route("POST", "/v1/replica/relationships/{vm}/point")
    def replica_point(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return lifecycle.point_now(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/final")
    def replica_final(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return lifecycle.final_marker(host, peer, req.params["vm"], req.json())

    @r.route("GET", "/v1/cluster/relationships/{vm}")
    def cluster_view(req):
        from ...cluster.status import local_view
        trust.require_peer(host, req.peer_fingerprint)
        return local_view(host, req.params["vm"])

    @r.route("POST", "/v1/peer/relationships/{vm}/dr")
    def peer_dr(req):
        from ...primary import dr
        peer = trust.require_peer(host, req.peer_fingerprint)
        return dr.remember(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/transfer")
    def replica_transfer(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        with host.vm_lock(req.params["vm"]):
            return lifecycle.transfer(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/cluster/relationships/{vm}/handover")
    def cluster_handover(req):
        from ...cluster import ops
        peer = trust.require_peer(host, req.peer_fingerprint)
        return ops.handover(host, peer, req.params["vm"], req.json())

    @r.route("GET", "/v1/peer/relationships/{vm}/primary-state")
    def primary_state(req):
        """The replica asks before an unplanned failover (replica.failover._guard)."""
        peer = trust.require_peer(host, req.peer_fingerprint)
        return primary_view(host, peer, req.params["vm"])

    @r.route("GET", "/v1/replica/relationships/{vm}/state")
    def replica_state(req):
        """The primary asks whether it still is one (see primary.standing.check_peer)."""
        peer = trust.require_peer(host, req.peer_fingerprint)
        removal.refuse_if_removed(host, peer, req.params["vm"])
        return lifecycle.state_for_primary(host, peer, req.params["vm"], _epoch(req))

    @r.route("GET", "/v1/replica/relationships/{vm}/points")
    def replica_points(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        rel = host.store.relationship(req.params["vm"])
        if rel is None or rel.peer != peer["name"]:
            raise Refused(f"{host.name} holds no replica of {req.params['vm']} for {peer['name']}")
        settled(host, req.params["vm"])
        return {"points": rpoints.listing(host, req.params["vm"])}

    @r.route("GET", "/v1/replica/relationships/{vm}/manifest")
    def replica_manifest(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        disks = req.query.get("disks")
        return rreverse.manifest(host, peer, req.params["vm"], _epoch(req),
                                 disks.split(",") if disks is not None else None)

    @r.route("POST", "/v1/replica/relationships/{vm}/reverse")
    def replica_reverse(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return rreverse.become_replica(host, peer, req.params["vm"], req.json())

    @r.route("DELETE", "/v1/replica/relationships/{vm}")
    def remove(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        if flag(req, "ended"):
            # The primary ended its side after a "removed" refusal: only the tombstone goes.
            return {"vm": req.params["vm"], "already": True,
                    "tombstone": removal.forget(host, req.params["vm"], peer["name"])}
        rel = host.store.relationship(req.params["vm"])
        if rel is not None and rel.peer != peer["name"]:
            raise Refused(f"{req.params['vm']} on {host.name} is replicated from {rel.peer}")
        if rel is None and removal.forget(host, req.params["vm"], peer["name"]):
            return {"vm": req.params["vm"], "already": True}   # removed here before
        return removal.remove_relationship(host, req.params["vm"], flag(req, "keep"))

    @r.route("POST", "/v1/peer/relationships/{vm}/removed")
    def peer_removed(req):
        """The replica runs `remove` and tells its primary first."""
        peer = trust.require_peer(host, req.peer_fingerprint)
        return prim.removed_by_replica(host, peer, req.params["vm"], req.json())

    return r


def primary_view(host, peer: dict, vm: str) -> dict:
    """For ``peer``, the replica of ``vm``: whether the VM runs here, and this host's
    relationship with that replica (its main one, or the DR link). Read only, no lock."""
    from ...domain.links import dr_key
    rel = None
    for key in (vm, dr_key(vm)):
        found = host.store.relationship(key)
        if found is not None and found.peer == peer["name"]:
            rel = found
            break
    try:
        info = host.driver.inspect(vm)
        # A replica side's VM is one vmreplica made: an existing domain of that name (the
        # primary's own, where one libvirtd holds both hosts) is not it.
        replica_side = rel is not None and rel.role == "replica"
        power = info.state if info.origin == Origin.VMREPLICA or not replica_side else None
    except Exception:  # noqa: BLE001 — the answer says "unknown"; the replica then goes by state
        power = None          # not defined here, or the hypervisor cannot say
    out = {"host": host.name, "vm": vm, "vm_state": power,
           "role": rel.role if rel else "none"}
    if rel is not None:
        out |= {"state": rel.state, "epoch": rel.epoch, "mode": rel.mode,
                "sync_state": rel.sync_state, "last_cycle_at": rel.last_cycle_at,
                "last_success_at": rel.last_success_at, "fenced": bool(rel.fenced),
                "prepared": rel.state == "prepared_for_failover"}
    return out
