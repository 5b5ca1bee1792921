"""Primary-side relationship operations: enable, initial, sync, suspend, resume, remove, status."""

from __future__ import annotations

import time
import uuid

from ..domain import points as dp
from ..domain.links import dr_key, is_dr, vm_name
from ..domain.schedule import format_frequency, parse_frequency, parse_window
from ..domain.states import Role, State, check_transition, next_step, suspend_allowed
from ..errors import (Conflict, NotFound, OperationError, Refused, Removed, Superseded,
                      Unreachable, UsageError)
from .cycle import run_cycle

COMPRESSIONS = ("zstd", "none")


def enable(host, vm: str, replica: str, frequency: str = "5m", compression: str = "zstd",
           exclude_disks: list[str] | None = None, security_tag: str = "",
           history: int = 4, point_interval: str = "1h", app_every: int = 0,
           resync_window: str | None = None, mode: str = "periodic",
           max_stall: float = 5.0, cluster: bool = False, dr: bool = False) -> dict:
    """Replicate ``vm`` to ``replica`` (its main relationship), or with ``dr`` as its
    disaster-recovery link (key NAME@dr, periodic; see domain.links): then the partner of
    the main relationship, if any, may take the link over when the VM moves there."""
    info = host.driver.inspect(vm)  # NotFound with a clear message
    key = dr_key(vm) if dr else vm
    existing = host.store.relationship(key)
    if existing is not None:
        where = "to " + existing["peer"] if existing["role"] == "primary" else "from " + existing["peer"]
        raise Conflict(f"VM {vm} is already replicated {where} (state {existing['state']})"
                       + (" by its DR link" if dr else ""),
                       hint=f"use `vmreplica set {key}` to change it, or `vmreplica remove "
                            f"{key}` first")
    main = host.store.relationship(vm) if dr else None
    if dr:
        from .dr import holders_for
        holders = holders_for(host, vm, main, mode)
    else:
        holders = [host.name]
    freq = parse_frequency(frequency)
    history = dp.validate_history(history)
    interval = dp.parse_interval(point_interval)
    if int(app_every) < 0:
        raise UsageError("--app-consistent-every must be 0 (never) or more")
    parse_window(resync_window)
    _check_mode(host, mode, max_stall)
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r}", hint="choose zstd or none")
    names = [d.name for d in info.disks]
    exclude = list(exclude_disks or [])
    for name in exclude:
        if name not in names:
            raise UsageError(f"VM {vm} has no disk {name!r} to exclude",
                             hint=f"its disks are {', '.join(names)}")
    disks = [d for d in info.disks if d.name not in exclude]
    if not disks:
        raise UsageError(f"every disk of {vm} is excluded: nothing to replicate")
    for d in disks:
        _check_disk(vm, d)
    client = host.client_for_address(replica)  # NotTrusted if not paired
    peer = host.store.peer_by_address(f"{client.host}:{client.port}")
    if main is not None:
        from .dr import tell_partner
        tell_partner(host, vm, main, peer)
    desc = host.driver.describe(vm)
    desc["disks"] = [{"name": d.name, "format": d.format, "virtual_size": d.virtual_size}
                     for d in disks]
    rel_id = uuid.uuid4().hex
    answer = client.request("POST", "/v1/replica/relationships", {
        "vm": vm, "id": rel_id, "epoch": 1, "security_tag": security_tag,
        "frequency": freq, "description": desc, "history": history,
        "point_interval": interval, "mode": mode, "max_stall": float(max_stall),
        "cluster": cluster, "holders": holders,
    })
    rel = primary_row(key, rel_id, peer, State.READY_FOR_INITIAL, 1, [d.name for d in disks],
                      frequency=freq, compression=compression, excluded=exclude,
                      security_tag=security_tag, history=history, point_interval=interval,
                      app_every=int(app_every), resync_window=resync_window or None,
                      mode=mode, max_stall=float(max_stall), cluster=cluster, holders=holders)
    try:
        host.store.add_relationship(rel)
    except Exception:
        client.request("DELETE", f"/v1/replica/relationships/{vm}")
        raise
    host.event("relationship", f"{'DR link' if dr else 'replication'} enabled to "
                               f"{peer['name']} every {format_frequency(freq)}"
               + (f" (it follows the VM to {', '.join(holders[1:])})" if holders[1:] else ""),
               key)
    return {"vm": key, "replica": peer["name"], "state": rel["state"], "holders": holders,
            "replica_heads": answer.get("heads"), "next": f"vmreplica initial {key}"}


def primary_row(key: str, rel_id: str, peer: dict, state: State, epoch: int,
                disks: list[str], **settings) -> dict:
    """A new primary-side relationship row: no tracking point yet, the settings given
    (the rest at their defaults)."""
    row = {"frequency": 300, "compression": "zstd", "excluded": [], "security_tag": "",
           "history": 4, "point_interval": 3600, "app_every": 0, "resync_window": None,
           "mode": "periodic", "max_stall": 5.0, "cluster": False, "holders": []}
    row.update(settings)
    row.update({"vm": key, "id": rel_id, "role": Role.PRIMARY.value, "peer": peer["name"],
                "peer_address": peer["address"], "state": state.value, "epoch": epoch,
                "disks": disks, "cycle": -1, "bitmap": None, "tracker": "bitmap",
                "consecutive_failures": 0})
    return row


def check_peer(host, vm: str, timeout: float = 10.0) -> dict:
    """Ask the replica whether this host is still the primary of ``vm``. A replica that
    has taken over answers `superseded`: this host fences its copy (powers it off; `vm
    start` refuses it) — the "two copies on one network" case after an unplanned failover.
    Raises Superseded then; Unreachable if the replica cannot be asked."""
    from ..errors import Superseded
    from .cycle import _fence
    rel = host.store.relationship(vm)
    try:
        return host.client_for_peer(rel["peer"], timeout=timeout).request(
            "GET", f"/v1/replica/relationships/{vm_name(vm)}/state?epoch={rel['epoch']}")
    except Removed:
        end_removed_later(host, vm, rel["id"], rel["peer"])
        raise
    except Superseded as e:
        if is_dr(vm):
            if rel["state"] != State.STANDBY.value:
                host.store.update_relationship(vm, state=State.STANDBY.value, last_error=e.message)
                host.event("dr", f"the DR link was taken over by another host: standing by "
                                 f"({e.message})", vm)
        elif not rel.get("fenced"):
            with host.vm_lock(vm):
                host.store.update_relationship(
                    vm, state=State.ERROR.value, last_error=e.message,
                    fenced=f"{rel['peer']} has become the primary ({e.message})")
                _fence(host, vm)
        raise


MODES = ("periodic", "continuous")


def _check_mode(host, mode: str, max_stall: float) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}", hint="choose periodic or continuous")
    if mode == "continuous" and not hasattr(host.driver, "mirror_start"):
        raise UsageError(f"continuous mode is not available on {host.driver.name} hosts",
                         hint="use --mode periodic")
    if not 0.5 <= float(max_stall) <= 120:
        raise UsageError("--max-stall must be between 0.5 and 120 seconds")


def _check_disk(vm: str, d) -> None:
    """qcow2 (v3: persistent bitmaps) and raw (tracked while the VM runs, resynchronised
    after a restart) disks can be replicated; nothing else."""
    from ..qemutools import img
    if d.format == "raw":
        return
    if d.format != "qcow2":
        raise UsageError(f"disk {d.name} of {vm} is {d.format}: only qcow2 and raw disks can "
                         "be replicated",
                         hint=f"convert it (`qemu-img convert -O qcow2`) or exclude it with "
                              f"`--exclude-disk {d.name}`")
    compat = img.info(d.path).get("format-specific", {}).get("data", {}).get("compat")
    if compat == "0.10":
        raise UsageError(f"disk {d.name} of {vm} is qcow2 version 2 (compat 0.10), which cannot "
                         "keep persistent dirty bitmaps",
                         hint=f"upgrade it while the VM is off: `qemu-img amend -o compat=1.1 "
                              f"{d.path}`, or exclude it with `--exclude-disk {d.name}`")


def _rel(host, vm: str, role: str = "primary") -> dict:
    rel = host.store.relationship(vm)
    if rel is None and is_dr(vm):
        raise NotFound(f"{vm_name(vm)} has no DR link on {host.name}",
                       hint=f"`vmreplica enable {vm_name(vm)} --replica HOST:PORT --dr` where "
                            "it runs; `vmreplica status` lists the links of this host")
    if rel is None:
        try:
            host.driver.inspect(vm)
        except NotFound:
            raise NotFound(f"no VM named {vm} on {host.name}",
                           hint="`vmreplica vm list` shows the VMs of this host") from None
        raise NotFound(f"VM {vm} is not replicated", hint=f"enable it with `vmreplica enable {vm} "
                                                          "--replica HOST:PORT`")
    if role and rel["role"] != role:
        raise UsageError(f"{host.name} is the {rel['role']} side of {vm}: run this on its "
                         f"{role} ({rel['peer']})")
    return rel


def sync(host, vm: str, verify: bool = False) -> dict:
    rel = _rel(host, vm)
    if rel["state"] == State.INITIAL_IN_PROGRESS.value and rel.get("seed"):
        from .seeding import imported
        if not imported(host, vm, check_peer(host, vm)):
            raise Conflict(f"{vm} waits for its seed to be imported on {rel['peer']}",
                           hint=f"on {rel['peer']}: vmreplica initial {vm} --import DIR")
        rel = _rel(host, vm)
    if rel["state"] not in (State.REPLICATING.value, State.ERROR.value):
        hint = {
            State.READY_FOR_INITIAL.value: f"run `vmreplica initial {vm}` first",
            State.SUSPENDED.value: f"resume it with `vmreplica resume {vm}`",
            State.RESYNC_REQUIRED.value: "change tracking was broken: a resynchronization is required",
        }.get(rel["state"])
        raise Conflict(f"{vm} cannot sync in state {rel['state']}", hint=hint)
    stats = run_cycle(host, vm, verify=verify)
    if rel["state"] == State.ERROR.value:
        host.store.update_relationship(vm, state=State.REPLICATING.value)
    return stats


def suspend(host, vm: str) -> dict:
    rel = _rel(host, vm)
    if not suspend_allowed(rel["state"]):
        raise Conflict(f"{vm} cannot be suspended in state {rel['state']}")
    host.store.update_relationship(vm, state=State.SUSPENDED.value, suspended_from=rel["state"])
    host.event("relationship", "replication suspended (changes are still tracked)", vm)
    return {"vm": vm, "state": State.SUSPENDED.value}


def resume(host, vm: str) -> dict:
    rel = _rel(host, vm)
    if rel["state"] != State.SUSPENDED.value:
        raise Conflict(f"{vm} is not suspended (state {rel['state']})")
    back = rel.get("suspended_from") or State.REPLICATING.value
    if back == State.SUSPENDED.value:
        back = State.REPLICATING.value
    check_transition(State.SUSPENDED, back)
    host.store.update_relationship(vm, state=back, last_attempt_at=None)
    host.event("relationship", "replication resumed", vm)
    return {"vm": vm, "state": back}


def remove(host, vm: str, keep_replica: bool = False, force: bool = False) -> dict:
    rel = _rel(host, vm, role="")
    if rel["role"] == Role.REPLICA.value:
        # Run on the replica: it tells the primary first (or keeps a tombstone for it).
        from ..replica.receiver import remove_relationship
        return remove_relationship(host, vm, keep_replica, tell_primary=True)
    if rel.get("mode") == "continuous":
        host.continuous.stop(vm)            # the mirror ends before the replica goes
    remote = "removed"
    answer: dict = {}
    try:
        if rel["state"] == State.STANDBY.value:
            raise Superseded("another host holds this DR link now")
        q = "?keep=1" if keep_replica else ""
        answer = host.client_for_peer(rel["peer"], timeout=120).request(
            "DELETE", f"/v1/replica/relationships/{vm_name(vm)}{q}")
        if answer.get("already"):
            remote = "already gone"
    except NotFound:
        remote = "already gone"
    except Superseded:
        remote = "held by another host: kept"      # a DR link the VM took elsewhere
    except Unreachable as e:
        if not force:
            raise Unreachable(e.message, hint=f"nothing was removed; retry when {rel['peer']} is "
                              "back, or use --force to remove it here only (then run `vmreplica "
                              f"remove {vm}` on {rel['peer']})") from None
        remote = "unreachable: not removed there"
    with host.vm_lock(vm):
        _end_here(host, vm, rel)
    host.event("relationship", f"replication removed (replica: {remote})", vm)
    return {"vm": vm, "replica": rel["peer"], "replica_side": remote,
            "kept_copy": answer.get("kept_copy")}


def _end_here(host, vm: str, rel: dict) -> None:
    """This host's side of a relationship ends (under the VM's lock, the continuous
    mirror already stopped): every tracking bitmap it made dropped, its rows deleted."""
    try:
        _drop_bitmaps(host, rel)
    except OperationError as e:
        if rel["state"] != State.STANDBY.value:
            raise
        # The VM is a replica here now: its disks belong to the replication into them.
        host.event("relationship", f"the DR link's tracking bitmaps stay on the disks "
                                   f"(they are in use: {e.message})", vm)
    host.store.remove_relationship(vm)


def removed_by_replica(host, peer: dict, vm: str, body: dict) -> dict:
    """The replica ``peer`` runs `remove` and tells this host, its primary, first: this
    side ends as `remove` here would end it (it does not call the replica back)."""
    from ..domain.links import dr_key
    rel_id = body.get("id")
    found = None
    for key in (vm, dr_key(vm)):
        rel = host.store.relationship(key)
        if rel is not None and rel["role"] == Role.PRIMARY.value and rel["peer"] == peer["name"]:
            found = rel
            break
    if found is None:
        raise NotFound(f"{host.name} does not replicate {vm} to {peer['name']}")
    if rel_id and found["id"] != rel_id:
        raise Refused(f"{host.name} replicates {vm} to {peer['name']} in another relationship "
                      f"({found['id'][:8]}, not {str(rel_id)[:8]})")
    end_removed(host, found["vm"], found["id"], peer["name"])
    return {"vm": found["vm"], "removed": True}


def end_removed(host, vm: str, rel_id: str, by: str, tell: bool = False) -> bool:
    """End this side of relationship ``rel_id`` of ``vm``, which its replica ``by``
    removed: as `remove` (mirror stopped, bitmaps dropped, rows deleted), with an event.
    ``tell``: then say so to the replica, which drops its tombstone. False if that
    relationship is no longer here."""
    rel = host.store.relationship(vm)
    if rel is None or rel["id"] != rel_id:
        return False
    if rel.get("mode") == "continuous":
        host.continuous.stop(vm)
    with host.vm_lock(vm):
        rel = host.store.relationship(vm)
        if rel is None or rel["id"] != rel_id:
            return False
        _end_here(host, vm, rel)
    host.event("relationship", f"replication removed by its replica {by}", vm)
    if tell:          # (only its tombstone goes: whatever else it holds now stays)
        try:
            host.client_for_peer(by, timeout=30).request(
                "DELETE", f"/v1/replica/relationships/{vm_name(vm)}?ended=1")
        except OperationError as e:   # the tombstone stays there: harmless, and a new
            host.event("relationship", f"{by} was not told that this side ended too: "
                                       f"{e.message}", vm)   # relationship drops it
    return True


def end_removed_later(host, vm: str, rel_id: str, by: str) -> None:
    """``end_removed`` on a thread of its own: the caller (a cycle, a state check) may
    hold the VM's lock or be the continuous mode's worker, and goes on with its error."""
    import threading

    def run():
        try:
            end_removed(host, vm, rel_id, by, tell=True)
        except Exception:  # noqa: BLE001 — the next call is refused again and retries it
            import logging
            logging.getLogger("vmreplica.primary").exception(
                "ending the relationship of %s its replica removed", vm)
    threading.Thread(target=run, name=f"removed-{vm}", daemon=True).start()


def _drop_bitmaps(host, rel: dict) -> None:
    """Remove every bitmap this relationship made on the VM's disks (invariant 6)."""
    from ..tracking.bitmap import bitmap_prefix
    name = vm_name(rel["vm"])
    try:
        host.driver.inspect(name)
    except NotFound:
        return
    tracker = host.tracker(rel.get("tracker", "bitmap"))
    disks = [d.name for d in host.driver.inspect(name).disks]   # excluded ones too
    with host.driver.block_session(name) as session:
        names = tracker.owned(session, disks, bitmap_prefix(rel["id"]))
        if names:
            session.release(disks, sorted(names))
