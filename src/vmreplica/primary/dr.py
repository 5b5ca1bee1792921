"""The disaster-recovery link (domain.links): a periodic replication of a VM to a third
host that follows the VM between the two hosts of its main relationship (the two nodes
of a cluster, or a primary and its replica after a failover).

- `enable VM --replica DR --dr` on the host that runs the VM creates the link (key
  NAME@dr); the DR host records both hosts as its holders, and the partner learns where
  the DR host is (`remember`);
- when the VM runs on the partner (it took the VM over), `adopt` takes the link over:
  the DR host raises the epoch (the host the VM left is refused from then on and stands
  by) and the first cycle from here is a hash resync — the tracking bitmaps stayed on the
  other host, so what changed since the last DR cycle is in doubt, and only the blocks
  that differ move;
- a DR host that has failed the VM over refuses the take-over: epochs decide, nothing it
  holds is overwritten.
"""

from __future__ import annotations

import logging
import time

from ..domain.links import dr_key, runs_here
from ..domain.relationship import Relationship
from ..domain.states import State
from ..errors import Conflict, NotFound, UsageError, VmreplicaError

log = logging.getLogger("vmreplica.dr")


def holders_for(host, vm: str, main: Relationship | None, mode: str) -> list[str]:
    """`enable --dr`: the hosts that may hold the link (this one and the partner of the
    VM's main relationship), after checking that a DR link fits here."""
    if mode != "periodic":
        raise UsageError("a DR link replicates periodically (--mode periodic)")
    if main is None:
        return [host.name]
    if main.role != "primary":
        raise Conflict(f"{vm} is a replica on {host.name}: enable its DR link where it "
                       f"runs ({main.peer})")
    if main.mode == "continuous" and not host.driver.live_views:
        # libvirt's backup job (its only frozen view) is refused beside its mirror.
        raise UsageError(f"a DR link beside continuous mode needs the qemu driver "
                         f"({vm} runs on {host.driver.name})",
                         hint=f"switch {vm} to periodic mode first (`vmreplica set {vm} "
                              "--mode periodic`)")
    return [host.name, main.peer]


def tell_partner(host, vm: str, main: Relationship, dr_peer: dict) -> None:
    """Tell the partner of ``vm``'s main relationship where its DR host is, after
    checking that it trusts that host (it could not take the link over otherwise)."""
    if dr_peer["address"] == main.peer_address:
        raise Conflict(f"{dr_peer['name']} already holds {vm}'s main replica: a DR link goes "
                       "to a third host")
    answer = host.client_for_peer(main.peer, timeout=30).request(
        "POST", f"/v1/peer/relationships/{vm}/dr",
        {"peer": dr_peer["name"], "address": dr_peer["address"],
         "fingerprint": dr_peer["fingerprint"]})
    if not answer.get("trusted"):
        raise Conflict(f"{main.peer} is not paired with {dr_peer['name']}: it could not take "
                       f"the DR link of {vm} over when the VM moves there",
                       hint=f"on {dr_peer['name']} run `vmreplica trust token`, then on "
                            f"{main.peer} `vmreplica trust pair {dr_peer['address']} TOKEN`")


def remember(host, peer: dict, vm: str, body: dict) -> dict:
    """On the partner: note ``vm``'s DR host; say whether this host trusts it."""
    main = host.store.relationship(vm)
    if main is None or main.peer != peer["name"]:
        raise NotFound(f"{host.name} holds no relationship of {vm} with {peer['name']}")
    mine = host.store.peer_by_fingerprint(str(body.get("fingerprint", "")))
    host.store.update_relationship(vm, dr_peer=body.get("peer"), dr_address=body.get("address"))
    return {"vm": vm, "trusted": mine is not None}


def adopt(host, vm: str, replica: str | None = None, resync: bool = True) -> dict:
    """Take ``vm``'s DR link over on this host, which runs the VM now."""
    main = host.store.relationship(vm)
    if not runs_here(main):
        raise Conflict(f"{vm} does not run on {host.name} (its relationship here is "
                       f"{main.role}, {main.state}): the DR link stays where the VM runs",
                       hint=f"adopt it on {main.peer}")
    info = host.driver.inspect(vm)                     # NotFound: no such VM
    key = dr_key(vm)
    rel = host.store.relationship(key)
    if rel is not None:
        client = host.client_for_peer(rel.peer, timeout=60)
    else:
        address = replica or (main.dr_address if main else None)
        if not address:
            raise UsageError(f"{vm} has no DR link on {host.name} and its partner named no "
                             "DR host", hint=f"vmreplica dr adopt {vm} --replica HOST:PORT")
        client = host.client_for_address(address, timeout=60)
    answer = client.request("POST", f"/v1/replica/relationships/{vm}/transfer",
                            {"id": rel.id if rel else None})
    disks = {d.name for d in info.disks}
    missing = [d for d in answer["disks"] if d not in disks]
    if missing:
        raise Conflict(f"{vm} on {host.name} has no disk {', '.join(missing)} that its DR "
                       "replica holds")
    reason = f"the VM moved to {host.name}: a hash resync settles what is in doubt"
    if rel is None:
        from .common import primary_row
        peer = host.store.peer_by_address(f"{client.host}:{client.port}")
        row = primary_row(key, answer["id"], peer, State.RESYNC_REQUIRED, int(answer["epoch"]),
                          list(answer["disks"]), frequency=int(answer["frequency"]),
                          security_tag=answer.get("security_tag", ""),
                          history=int(answer["history"]),
                          point_interval=int(answer["point_interval"]),
                          holders=list(answer.get("holders") or []),
                          resync_reason=reason, replicating_since=time.time(),
                          cycle=int(answer.get("last_applied_cycle", -1)))
        host.store.add_relationship(row)
    else:
        host.store.set_state(key, State.RESYNC_REQUIRED.value,
                             epoch=int(answer["epoch"]), resync_reason=reason,
                             cycle=max(rel.cycle, int(answer.get("last_applied_cycle", -1))),
                             consecutive_failures=0, last_error=None, fenced=None,
                             last_resync_attempt_at=None)
    rel = host.store.relationship(key)
    host.event("dr", f"took the DR link to {rel.peer} over (epoch {rel.epoch}); {reason}",
               key)
    out = {"vm": key, "replica": rel.peer, "epoch": rel.epoch, "state": rel.state}
    if resync:
        from .resync import resync as run_resync
        stats = run_resync(host, key)
        out = dict(out, state=host.store.relationship(key).state,
                   bytes_moved=stats["bytes_moved"],
                   compared_bytes=stats.get("compared_bytes"), seconds=stats.get("seconds"))
    return out


def adopt_quietly(host, vm: str) -> None:
    """After a take-over (cluster): adopt the DR link if the VM has one, on a thread of
    its own (a DR site far away or down must not delay the VM's start); the scheduler's
    automatic resync does the rest. Failures are events, never the take-over's."""
    import threading
    threading.Thread(target=_adopt_quietly, args=(host, vm), name=f"dr-adopt-{vm}",
                     daemon=True).start()


def _adopt_quietly(host, vm: str) -> None:
    main = host.store.relationship(vm)
    rel = host.store.relationship(dr_key(vm))
    if rel is None and not (main and main.dr_address):
        return
    if rel is not None and rel.state != State.STANDBY.value:
        return                                  # the link is here already
    try:
        adopt(host, vm, resync=False)
    except VmreplicaError as e:
        host.event("dr", f"could not take the DR link over: {e.message}"
                   + (f" ({e.hint})" if e.hint else ""), dr_key(vm))
        log.warning("DR link of %s not taken over: %s", vm, e.message)


def stand_by_if_moved(host, rel: Relationship) -> bool:
    """Scheduler: a DR link whose VM no longer runs here stands by (True)."""
    from ..domain.links import vm_name
    if rel.state == State.STANDBY.value:
        return True
    if runs_here(host.store.relationship(vm_name(rel.vm))):
        return False
    host.store.set_state(rel.vm, State.STANDBY.value)
    host.event("dr", "the VM no longer runs here: the DR link stands by until it returns",
               rel.vm)
    return True
