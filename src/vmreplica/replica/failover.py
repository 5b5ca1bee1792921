"""Failover on the replica host: test failover, planned and unplanned failover, cancel,
complete. Every VM is started from an overlay on a frozen layer (or on the head), so
starting one takes the same time whatever the disk size, and cancelling one throws its
writes away without touching a recovery point.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypeGuard

from ..domain.links import vm_name
from ..domain.relationship import Relationship
from ..domain.states import State
from ..errors import Conflict, NotFound, Unreachable, UsageError, VmreplicaError
from ..hypervisor.base import Origin
from ..qemutools import img
from . import collapse, mirror, nvram, points, reip
from . import store as rstore


def _replica_rel(host, vm: str) -> Relationship:
    rel = host.store.relationship(vm)
    if rel is None:
        raise NotFound(f"{host.name} holds no replica of {vm}",
                       hint="`vmreplica status` lists the relationships of this host")
    if rel.role != "replica":
        raise UsageError(f"{host.name} is the primary of {vm}: run this on its replica "
                         f"({rel.peer})",
                         hint=f"on this host, `vmreplica failover {vm} --prepare` starts a "
                              "planned failover")
    return rel


def _layer_of(host, rel: Relationship, point) -> tuple[int, str]:
    """(layer index, label) of a point id, or of the newest point when None."""
    if point == "latest":
        return len(next(iter(rel.chains.values()))) - 1, "latest"
    p = points.find(host, rel.vm, point)
    return p.layer, str(p.id)


def _point_id(label: str) -> int | None:
    """A point's id from its label (None: the latest state)."""
    return None if label == "latest" else int(label)


def _overlays(rel: Relationship, layer: int, name: str) -> dict[str, str]:
    made = {}
    try:
        for disk, chain in rel.chains.items():
            path = rstore.vm_dir(Path(rel.storage), rel.vm) / disk
            path.mkdir(parents=True, exist_ok=True)
            made[disk] = rstore.overlay(path / f"{name}.qcow2", chain[layer])
    except Exception:
        rstore.drop_layers(list(made.values()))
        raise
    return made


# -- test failover -------------------------------------------------------------------------

def test_start(host, vm: str, point=None, network: str | None = None,
               re_ip: bool = False) -> dict:
    """A test VM from a point (the latest state by default), its writes on overlays. Its
    NICs: a replica carried from an existing libvirt domain puts every NIC on
    ``network`` (default "isolated": no forwarding, made on demand; "none": no NIC; or a
    network or bridge of this host); other VMs have none or one on "isolated". With
    ``re_ip`` the test VM gets the failover IPs once its agent answers (replica.reip);
    without, it keeps the primary's addresses."""
    t0 = time.monotonic()
    if re_ip and not _replica_rel(host, vm).failover_ips:
        raise UsageError(f"{vm} has no failover IPs to set in the test VM",
                         hint=f"on its primary: `vmreplica set {vm} --failover-ip "
                              "NIC=ADDR/PREFIX[,gw=GW][,dns=A+B]`")
    carried = bool(host.driver.describe(vm).get("definition")) \
        if host.driver.exists(vm) else False
    network = network or ("isolated" if carried else "none")
    if not carried and network not in ("none", "isolated"):
        raise UsageError(f"unknown network {network!r}", hint="choose none or isolated")
    with host.vm_lock(vm):
        rel = _replica_rel(host, vm)
        if rel.test:
            raise Conflict(f"a test failover of {vm} is already running ({rel.test['vm']})",
                           hint=f"stop it first: `vmreplica failover {vm} --stop-test`")
        if rel.state not in (State.REPLICATING.value, State.SUSPENDED.value):
            raise Conflict(f"{vm} cannot be tested in state {rel.state}")
        if point in (None, "latest"):
            # The newest state: freeze the head into a point (cycles go on into a new head).
            made = points.create(host, vm, "crash", rel.last_freeze_at or time.time(),
                                 apply_retention=False)  # retention waits for stop-test
            rel = host.store.relationship(vm)
            point = made["id"]
        layer, label = _layer_of(host, rel, point)
        test_vm = f"{vm}-test"
        try:
            host.driver.inspect(test_vm)
            raise Conflict(f"a VM named {test_vm} already exists on {host.name}",
                           hint="delete it, then start the test failover again")
        except NotFound:
            pass
        overlays = _overlays(rel, layer, "test")
        desc = host.driver.describe(vm)
        desc.update(name=test_vm, uuid=None, network=network,
                    disks=[dict(d, path=overlays[d["name"]], format="qcow2")
                           for d in desc["disks"] if d["name"] in overlays])
        if desc.get("definition"):       # every NIC of the whole VM on the test network
            desc["network_map"] = {"*": None if network == "none" else network}
        host.store.update_relationship(vm, test={"vm": test_vm, "point": label,
                                                 "overlays": overlays})
        try:
            host.driver.define_vm(desc)
            nvram.restore(rel, _point_id(label), host.driver.nvram_path(test_vm))
            host.driver.start(test_vm)
        except Exception:
            test_stop(host, vm)
            raise
        record = reip.launch(host, vm, test_vm, rel.failover_ips, "test") if re_ip else None
    host.event("failover", f"test failover started: {test_vm} from point {label}"
               + (" (re-IP once its guest agent answers)" if record else ""), vm)
    return {"vm": vm, "test_vm": test_vm, "point": label, "network": network,
            "seconds": round(time.monotonic() - t0, 3), "re_ip": _reip_text(record),
            "next": f"vmreplica failover {vm} --stop-test"}


def _reip_text(record: dict | None) -> str | None:
    if record is None:
        return None
    return (f"{len(record['ips'])} NIC(s) get their failover IPs once the guest agent of "
            f"{record['vm']} answers (up to {reip.AGENT_WAIT:.0f} s): a `re-ip` event says "
            "how it went")


def test_stop(host, vm: str) -> dict:
    with host.vm_lock(vm):
        rel = _replica_rel(host, vm)
        test = rel.test
        if not test:
            raise Conflict(f"no test failover of {vm} is running")
        try:
            host.driver.stop(test["vm"], force=True)
            host.driver.delete(test["vm"])
        except NotFound:
            pass
        rstore.drop_layers(list(test["overlays"].values()))
        host.store.update_relationship(vm, test=None, **_without_reip(rel, "test"))
        points.retain(host, vm)   # merges that waited for the test
    host.event("failover", f"test failover stopped: {test['vm']} and its files deleted", vm)
    return {"vm": vm, "stopped": test["vm"]}


# -- failover --------------------------------------------------------------------------------

def _startable(host, vm: str) -> Relationship:
    """The replica relationship of ``vm`` if a failover can start now; else the reason."""
    rel = _replica_rel(host, vm)
    if rel.test:
        raise Conflict(f"a test failover of {vm} is running",
                       hint=f"stop it first: `vmreplica failover {vm} --stop-test`")
    if rel.state == State.FAILOVER_IN_PROGRESS.value:
        raise Conflict(f"a failover of {vm} is already in progress (point "
                       f"{(rel.failover or {}).get('point')})",
                       hint=f"`vmreplica failover {vm} --complete` or `--cancel`")
    if rel.state == State.FAILED_OVER.value:
        raise Conflict(f"{vm} has already failed over to {host.name}",
                       hint=f"next: `vmreplica reverse {vm}`")
    if rel.state not in (State.REPLICATING.value, State.SUSPENDED.value, State.ERROR.value):
        raise Conflict(f"{vm} cannot fail over in state {rel.state}")
    return rel


def _is_planned(rel: Relationship, point) -> bool:
    prepared = rel.primary_prepared
    if not prepared:
        return False
    return point in (None, "latest") and \
        int(prepared["cycle"]) == rel.last_applied_cycle


# -- the primary asked first (an unplanned failover while it still runs the VM) -------------

PRIMARY_CHECK_TIMEOUT = 5.0   # seconds: a primary that takes longer counts as gone


def _ask_primary(host, rel: Relationship) -> dict:
    """What the primary says of the VM (service.api.peer.primary_view): {"reachable": True, "view": ...},
    or {"reachable": False, "error": ...} when it does not answer (the disaster case), or
    {"reachable": True, "view": None, "error": ...} when it answered without telling."""
    try:
        view = host.client_for_peer(rel.peer, timeout=PRIMARY_CHECK_TIMEOUT).request(
            "GET", f"/v1/peer/relationships/{vm_name(rel.vm)}/primary-state")
    except Unreachable as e:
        return {"reachable": False, "error": e.message}
    except VmreplicaError as e:
        return {"reachable": True, "view": None, "error": e.message}
    return {"reachable": True, "view": view}


def _primary_runs_it(view: dict | None) -> TypeGuard[dict]:
    """Whether the primary's copy of the VM runs (or, when its power state is unknown,
    whether its relationship still replicates and was not prepared for failover)."""
    if not view or view.get("role") != "primary" or view.get("fenced"):
        return False
    if view.get("vm_state") is not None:
        return view["vm_state"] != "stopped"
    return view.get("state") in (State.REPLICATING.value, State.SUSPENDED.value,
                                 State.RESYNC_REQUIRED.value, State.RESYNCHRONIZING.value)


def _ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _loss(host, rel: Relationship, point, view: dict) -> dict:
    """Since when the primary's writes would be lost: the freeze time of the chosen point
    (for the latest state: of the last applied cycle; now, for a continuous mirror in sync)."""
    now = time.time()
    if point in (None, "latest"):
        if view.get("mode") == "continuous" and view.get("sync_state") == "in_sync":
            since = now   # the mirror had every write; the primary's next ones are lost
        else:
            since = rel.last_freeze_at or rel.last_applied_at or now
        label = "the latest state"
    else:
        since = points.find(host, rel.vm, point).point_time
        label = f"point {point}"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return {"since": since, "seconds": round(now - since, 1),
            "text": f"{label} (frozen at {when}, {_ago(now - since)} ago)"}


def _guard(host, rel: Relationship, point, force: bool) -> dict:
    """Before an unplanned failover: ask the primary. Refuse (Conflict) while it answers
    and runs the VM, unless ``force``; return what the event log and the answer record."""
    vm, peer = rel.vm, rel.peer
    asked = _ask_primary(host, rel)
    if not asked["reachable"]:
        return {"primary": peer, "reachable": False, "error": asked["error"],
                "event": f"the primary {peer} could not be reached before the unplanned "
                         f"failover ({asked['error']}): failing over as in a disaster"}
    view = asked.get("view")
    if not _primary_runs_it(view):
        if view is None:
            said = f"it answered but could not tell whether {vm} runs there ({asked['error']})"
        else:
            said = (f"{vm} is {view.get('vm_state') or 'not defined'} there (relationship "
                    f"{view.get('state') or view.get('role')})")
        return {"primary": peer, "reachable": True, "running": False,
                "event": f"the primary {peer} answered before the unplanned failover: {said}"}
    loss = _loss(host, rel, point, view)
    state = view.get("state") or "unknown"
    if view.get("last_cycle_at"):
        state += f", its last cycle {_ago(time.time() - view['last_cycle_at'])} ago"
    if not force:
        raise Conflict(
            f"{peer} answers and {vm} runs there (relationship {state}): an unplanned failover "
            f"would start a second copy here from {loss['text']}, and every write {vm} made on "
            f"{peer} since then would be discarded at `reverse`",
            hint=f"for zero loss, prepare a planned failover on {peer}: `vmreplica failover "
                 f"{vm} --prepare --shutdown`, then run `vmreplica failover {vm}` here; to fail "
                 f"over anyway, pass --force")
    lost = f"every write {vm} made on {peer} since {loss['text']} will be discarded at `reverse`"
    return {"primary": peer, "reachable": True, "running": True, "forced": True,
            "lost_since": loss["since"], "lost_seconds": loss["seconds"],
            "warning": f"{vm} still runs on {peer}: power it off there; {lost}",
            "event": f"unplanned failover forced while the primary {peer} answered and {vm} ran "
                     f"there (relationship {state}): {lost}"}


def start(host, vm: str, point=None, force: bool = False) -> dict:
    """Planned (the primary prepared: the latest state, zero loss, committed at once) or
    unplanned (from the chosen point; cancel or complete it). An unplanned one asks the
    primary first and is refused while it answers and runs the VM, unless ``force``."""
    # Asked before the VM's lock is taken: the primary may be shipping a cycle to this host
    # meanwhile, and its receive must not wait for the answer.
    rel = _startable(host, vm)
    guard = None if _is_planned(rel, point) else _guard(host, rel, point, force)
    with host.vm_lock(vm):
        rel = _startable(host, vm)
        planned = _is_planned(rel, point)
        if not planned and guard is None:     # a cycle since undid the primary's prepare
            guard = _guard(host, rel, point, force)
        mirror.close_target(host, vm)   # no more mirrored writes...
        host.heads.close(vm)            # ...and no more cycles into the head from here on
        # The bases move into the VM's folder (O(1)) and the VM opens its chains so that
        # they can be merged into them live before `reverse` replicates from them.
        if _in_place(host, vm):
            layer, label = _layer_of(host, rel, "latest" if point is None else point)
            failover = {"point": label, "layer": layer, "overlays": {}, "planned": planned,
                        "at": time.time(), "in_place": True}
            host.store.set_state(vm, State.FAILOVER_IN_PROGRESS.value,
                                 failover=failover, index_valid=False)
            # (its own NVRAM file: the variables of the point, before the storage goes)
            nvram.restore(rel, _point_id(label), host.driver.nvram_path(vm))
            merged = _commit_in_place(host, vm)
            host.driver.start(vm)
            # (the addresses the operator set for this host after the reverse)
            return _in_place_done(host, vm, planned, label, guard, merged,
                                  _reip_started(host, vm, rel))
        bases = collapse.relocate_bases(host, vm)
        host.driver.collapse_prepare(vm, bases)
        rel = host.store.relationship(vm)
        layer, label = _layer_of(host, rel, "latest" if point is None else point)
        overlays = _overlays(rel, layer, f"failover-{int(time.time())}")
        failover = {"point": label, "layer": layer, "overlays": overlays, "planned": planned,
                    "at": time.time()}
        host.store.set_state(vm, State.FAILOVER_IN_PROGRESS.value,
                                       failover=failover, index_valid=False)
        host.driver.set_disks(vm, overlays)
        nvram.restore(rel, _point_id(label), host.driver.nvram_path(vm))
        try:
            host.driver.start(vm)
        except Exception:
            _undo(host, vm, failover)
            raise
        if planned:
            _commit(host, vm)
        record = _reip_started(host, vm, rel)
    kind = "planned" if planned else "unplanned"
    if not planned:
        assert guard is not None                # (unplanned: the primary was asked above)
        host.event("failover", guard["event"], vm)
    host.event("failover", f"{kind} failover: {vm} started from point {label}", vm)
    if planned:
        return {"vm": vm, "planned": True, "point": label, "state": State.FAILED_OVER.value,
                "re_ip": _reip_text(record), "next": f"vmreplica reverse {vm}"}
    assert guard is not None                    # (unplanned: the primary was asked above)
    out = {"vm": vm, "planned": False, "point": label,
           "state": State.FAILOVER_IN_PROGRESS.value,
           "primary": {k: v for k, v in guard.items() if k not in ("event", "warning")},
           "re_ip": _reip_text(record),
           "next": f"check the VM, then `vmreplica failover {vm} --complete` (or `--cancel` "
                   "to discard what it wrote and try another point)"}
    if guard.get("warning"):
        out["warning"] = guard["warning"]
    return out


# -- an operator's existing domain, at home again (failback after a reverse) ----------------

def _in_place(host, vm: str) -> bool:
    """Whether ``vm`` is an operator's existing libvirt domain (the replica side of a
    reverse, on the domain's own host): vmreplica never repoints its disks, so a
    failover merges the point into them and starts the domain exactly as it is."""
    return host.driver.inspect(vm).origin == Origin.EXISTING


def _commit_in_place(host, vm: str) -> int:
    """Merge each disk's chain up to the failover's layer into its base (the domain's own
    disk), offline, then commit the failover: the epoch goes up, the points and the
    replica storage go. A crash midway leaves FAILOVER_IN_PROGRESS with the intent;
    `--complete` merges again (the same bytes). Returns the bytes of the merged layers."""
    rel = host.store.relationship(vm)
    layer = int(rel.failover["layer"])
    merged = 0
    for chain in rel.chains.values():
        if layer > 0 and Path(chain[layer]).exists():
            merged += sum(rstore.layer_size(p) for p in chain[1:layer + 1])
            img.commit(chain[layer], chain[0])
    img.sync_files(*[c[0] for c in rel.chains.values()])
    with host.store.transaction():
        host.store.replace_points(vm, [])
        host.store.set_state(vm, State.FAILED_OVER.value,
                             chains={d: [c[0]] for d, c in rel.chains.items()},
                             epoch=rel.epoch + 1, primary_prepared=None,
                             failed_over_at=time.time(), collapse=None)
    rstore.drop_layers([p for c in rel.chains.values() for p in c[1:]])
    rstore.delete_chains(Path(rel.storage), vm)
    return merged


def _reip_started(host, vm: str, rel: Relationship) -> dict | None:
    """After a failover has started ``vm`` (the replica VM, or an existing domain at
    home): its failover IPs set inside the guest in the background, once its agent
    answers (replica.reip); the re-IP record, or None without failover IPs."""
    return reip.launch(host, vm, vm, rel.failover_ips, "failover") if rel.failover_ips \
        else None


def _in_place_done(host, vm: str, planned: bool, label: str, guard, merged: int,
                   record: dict | None) -> dict:
    kind = "planned" if planned else "unplanned"
    if guard is not None:
        host.event("failover", guard["event"], vm)
    host.event("failover", f"{kind} failover: point {label} merged into the disks of the "
                           f"existing domain {vm} ({merged / (1 << 20):.1f} MiB) and the "
                           "domain started as it is; committed at once (an existing "
                           "domain's own disks cannot be unwritten: no --cancel)", vm)
    out = {"vm": vm, "planned": planned, "point": label, "state": State.FAILED_OVER.value,
           "merged_bytes": merged, "re_ip": _reip_text(record),
           "next": f"vmreplica reverse {vm}"}
    if guard is not None:
        out["primary"] = {k: v for k, v in guard.items() if k not in ("event", "warning")}
        if guard.get("warning"):
            out["warning"] = guard["warning"]
    return out


def _undo(host, vm: str, failover: dict) -> None:
    try:
        host.driver.stop(vm, force=True)
    except NotFound:
        pass
    rel = host.store.relationship(vm)
    host.driver.set_disks(vm, {d: c[-1] for d, c in rel.chains.items()})
    host.driver.collapse_prepare(vm, {})
    rstore.drop_layers(list(failover["overlays"].values()))
    host.store.set_state(vm, State.REPLICATING.value, failover=None,
                         **_without_reip(rel, "failover"))


def _without_reip(rel: Relationship, purpose: str) -> dict:
    """The change that forgets the re-IP of a VM that goes (its test VM, a cancelled
    failover); a waiting thread then ends quietly."""
    return {"reip": None} if rel.reip and rel.reip.get("for") == purpose else {}


def cancel(host, vm: str) -> dict:
    with host.vm_lock(vm):
        rel = _replica_rel(host, vm)
        if rel.state != State.FAILOVER_IN_PROGRESS.value:
            raise Conflict(f"no failover of {vm} is in progress (state {rel.state})")
        if (rel.failover or {}).get("in_place"):
            raise Conflict(f"the failover of {vm} is merging its point into the existing "
                           "domain's own disks: it cannot be cancelled",
                           hint=f"finish it: `vmreplica failover {vm} --complete`")
        _undo(host, vm, rel.failover or {})
    host.event("failover", f"failover cancelled: what {vm} wrote was discarded", vm)
    return {"vm": vm, "state": State.REPLICATING.value,
            "next": f"vmreplica failover {vm} [--point ID]"}


def complete(host, vm: str) -> dict:
    with host.vm_lock(vm):
        rel = _replica_rel(host, vm)
        if rel.state != State.FAILOVER_IN_PROGRESS.value:
            raise Conflict(f"no failover of {vm} is in progress (state {rel.state})")
        if (rel.failover or {}).get("in_place"):
            _commit_in_place(host, vm)      # (a crash stopped it: the same bytes again)
            if host.driver.inspect(vm).state != "running":
                host.driver.start(vm)
        else:
            _commit(host, vm)
        rel = host.store.relationship(vm)
    host.event("failover", f"failover completed: epoch {rel.epoch}; point "
                           f"{rel.failover['point']} is now the VM's disk", vm)
    return {"vm": vm, "state": State.FAILED_OVER.value, "epoch": rel.epoch,
            "next": f"vmreplica reverse {vm}"}


def _commit(host, vm: str) -> None:
    """The failover's overlay becomes the top of the VM's chain; the epoch goes up, so
    the old primary can never ship into this VM again. The chain is to be merged into
    its base (replica.collapse, the first step of `reverse` or `remove`), so the points
    go: their layers stop being frozen."""
    rel = host.store.relationship(vm)
    fo = rel.failover
    layer = int(fo["layer"])
    chains, dropped = {}, []
    for disk, chain in rel.chains.items():
        chains[disk] = chain[:layer + 1] + [fo["overlays"][disk]]
        dropped += chain[layer + 1:]
    with host.store.transaction():
        host.store.replace_points(vm, [])   # the VM's disk now; merged into the base next
        host.store.set_state(vm, State.FAILED_OVER.value, chains=chains,
                                       epoch=rel.epoch + 1, primary_prepared=None,
                                       failed_over_at=time.time(),
                                       **collapse.begin(host, vm, chains))
    rstore.drop_layers(dropped)
