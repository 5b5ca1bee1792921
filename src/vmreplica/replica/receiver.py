"""Replica-side operations: accept a relationship, receive a cycle, stage it, apply it.

A cycle is staged durably first (records written as they arrive, each verified, then
fsync + rename + directory fsync + a row in the state store), applied into the heads,
and only then acknowledged; the heads' fdatasync and the stage's removal follow the ack
(replica.checkpoint). At start-up every staged cycle still listed is applied again
before the daemon serves anything (invariant 1: no torn head).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..domain.patterns import find_authorization
from ..domain.relationship import DEFAULTS, Relationship
from ..domain.states import Role, State
from ..domain.units import format_size
from ..errors import Conflict, NotFound, Refused, StorageFull, UsageError
from ..qemutools import img
from ..qemutools.buffers import POOL
from ..transport import wire
from ..transport.ahead import ahead
from . import apply as applier
from . import checkpoint, checks, mirror, points, unapplied
from . import index as rindex
from . import store as rstore

log = logging.getLogger("vmreplica.replica")


def safe_name(value, what: str) -> str:
    """A VM or disk name the primary sent, fit to be one component of a path here: no
    separator, no NUL or control character, not ``.`` or ``..``, not empty, not huge."""
    if (not isinstance(value, str) or not value or len(value) > 128 or value in (".", "..")
            or value[0] == "-" or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in value)):
        raise UsageError(f"invalid {what} name {str(value)[:80]!r} from the primary",
                         hint="a name may not be empty, '.', '..' or hold '/', '\\' or "
                              "control characters")
    return value


def _field(body: dict, key: str, kind, default=None, *, low=None, high=None):
    """``body[key]`` (or ``default``) as ``kind``; a wrong type or range is a UsageError."""
    value = body.get(key, default)
    if value is None and default is None:
        return None
    try:
        if kind is int and (isinstance(value, bool) or not isinstance(value, (int, str))):
            raise TypeError
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
            raise TypeError
        out = kind(value)
        if kind is float and out != out or out in (float("inf"), float("-inf")):  # noqa: PLR0124 — NaN
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                         f"not {str(value)[:40]!r}") from None
    if (low is not None and out < low) or (high is not None and out > high):
        raise UsageError(f"{key} {out} is out of range")
    return out


_BIG = (1 << 63) - 1


def _check_create_body(body: dict) -> tuple[str, list[dict]]:
    """The VM name and disk list of a relationship request, checked before anything is
    created from them (a VM named ``../x`` created its chains outside the storage)."""
    vm = safe_name(body.get("vm", ""), "VM")
    if not isinstance(body.get("id"), str) or not body["id"]:
        raise UsageError("the relationship request has no id")
    desc = body.get("description") or {}
    if not isinstance(desc, dict):
        raise UsageError("the VM description must be a JSON object")
    disks = desc.get("disks") or []
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        raise UsageError("the VM description's disks must be a list of objects")
    names = [safe_name(d.get("name"), "disk") for d in disks]
    if len(set(names)) != len(names):
        raise UsageError("the VM description names a disk twice")
    for d in disks:
        _field(d, "virtual_size", int, 0, low=1, high=1 << 55)
    for key in ("epoch", "frequency", "history", "point_interval"):
        _field(body, key, int, 1, low=0, high=_BIG)
    _field(body, "max_stall", float, DEFAULTS.max_stall, low=0)
    holders = body.get("holders")
    if holders is not None and not isinstance(holders, list):
        raise UsageError("holders must be a list of host names")
    for key in ("security_tag", "mode"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise UsageError(f"{key} must be a string")
    return vm, disks


def create_relationship(host, peer: dict, body: dict) -> dict:
    settings = host.store.get_setting("replica_server") or {}
    vm = str(body.get("vm", ""))
    if not settings.get("enabled"):
        raise Refused(f"{host.name} is not a replica server",
                      hint=f"on {host.name} run `vmreplica replica-server enable --allow "
                           f"{peer['name']}`")
    entry = find_authorization(host.store.authorizations(), peer["name"])
    if entry is None:
        raise Refused(f"primary {peer['name']} is not authorized to replicate to {host.name}",
                      hint=f"on {host.name} run `vmreplica replica-server enable --allow "
                           f"{peer['name']}` (or a pattern that matches it)")
    tag = str(body.get("security_tag") or "")
    if entry["tag"] and entry["tag"] != tag:
        raise Refused(f"security tag mismatch: {host.name} allows {peer['name']} only with tag "
                      f"{entry['tag']!r}, the primary sent {tag!r}",
                      hint=f"enable replication with `--security-tag {entry['tag']}`")
    vm, _ = _check_create_body(body)
    existing = host.store.relationship(vm)
    if existing is not None:
        if existing.id == body.get("id") and existing.peer == peer["name"]:
            return _describe(host, existing)  # retried request: idempotent
        raise Conflict(f"{host.name} already holds a relationship for VM {vm} "
                       f"(with {existing.peer})",
                       hint=f"remove it on {host.name} with `vmreplica remove {vm}` first")
    desc = body.get("description") or {}
    disks = desc.get("disks") or []
    if not disks:
        raise UsageError("the relationship has no disks to replicate")
    from . import removal
    # A VM of that name is refused, unless it is a kept replica of this same VM (`remove
    # --keep-replica`): it steps aside, its folder stays for `initial --method existing`.
    kept = removal.kept_replica(host, vm, desc.get("uuid"))
    storage = Path(entry["storage"] or settings.get("storage") or host.home.storage)
    if kept is not None:
        removal.release(host, vm, kept)
    try:
        chains = rstore.create_chains(storage, vm, disks)
    except Exception:
        if kept is not None:
            removal.redefine(host, kept)
        raise
    try:
        replica_desc = dict(desc)
        replica_desc["name"] = vm
        replica_desc["disks"] = [dict(d, path=chains[d["name"]][-1], format="qcow2")
                                 for d in disks]
        replica_desc["owns"] = [str(rstore.vm_dir(storage, vm))]
        host.driver.define_vm(replica_desc)
        host.store.add_relationship(Relationship(
            vm=vm, id=body["id"], role=Role.REPLICA.value, peer=peer["name"],
            peer_address=peer.get("address"), state=State.WAITING_FOR_INITIAL.value,
            epoch=int(body.get("epoch", 1)), storage=str(storage),
            disks=[d["name"] for d in disks], chains=chains,
            frequency=int(body.get("frequency", DEFAULTS.frequency)), security_tag=tag,
            history=int(body.get("history", DEFAULTS.history)),
            point_interval=int(body.get("point_interval", DEFAULTS.point_interval)),
            # Kept so that after a reverse this side replicates the same way.
            mode=body.get("mode") or DEFAULTS.mode,
            max_stall=float(body.get("max_stall", DEFAULTS.max_stall)),
            cluster=bool(body.get("cluster")),
            # The hosts that may take this replication over when the VM moves to them (a
            # DR link: the primary and the partner of its main relationship).
            holders=[str(h) for h in body.get("holders") or [peer["name"]]]))
    except Exception:
        try:
            host.driver.delete(vm)
        except Exception:  # noqa: BLE001
            pass
        rstore.delete_chains(storage, vm)
        if kept is not None:
            removal.redefine(host, kept)
        raise
    removal.forget(host, vm)             # a tombstone of an earlier relationship
    if kept is not None:
        host.driver.add_owned(vm, [str(kept)])      # removed with this replica from now on
    host.event("relationship", f"replica of {vm} created for primary {peer['name']}"
               + (f"; the kept replica in {kept} is ready for `initial {vm} --method existing "
                  f"--path {kept}`" if kept is not None else ""), vm)
    return _describe(host, host.store.relationship(vm))


def _describe(host, rel: Relationship) -> dict:
    return {"vm": rel.vm, "replica": host.name, "state": rel.state,
            "heads": {d: c[-1] for d, c in rel.chains.items()}}


def transfer(host, peer: dict, vm: str, body: dict) -> dict:
    """A DR link follows its VM: ``peer``, one of the relationship's holders, runs the VM
    now and takes the replication over. The epoch goes up, so the host it leaves is
    refused from now on (Superseded: it stands by); the new holder settles whatever is in
    doubt with a hash resync against this side's index. A replica that has failed over
    (the DR site runs the VM) refuses: nothing it holds is overwritten."""
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value:
        raise NotFound(f"{host.name} holds no replica of VM {vm}",
                       hint="enable the DR link again (`vmreplica dr enable`) from the host "
                            "that runs the VM")
    if body.get("id") and body["id"] != rel.id:
        raise Refused(f"{host.name}'s replica of {vm} belongs to another relationship")
    holders = rel.holders or [rel.peer]
    if peer["name"] not in holders:
        raise Refused(f"{peer['name']} may not take over the replication of {vm}: {host.name} "
                      f"accepts it only from {', '.join(holders)}")
    if find_authorization(host.store.authorizations(), peer["name"]) is None:
        raise Refused(f"primary {peer['name']} is not authorized to replicate to {host.name}",
                      hint=f"on {host.name} run `vmreplica replica-server enable --allow "
                           f"{peer['name']}`")
    if rel.state in (State.FAILOVER_IN_PROGRESS.value, State.FAILED_OVER.value) or \
            rel.failover:
        raise Conflict(f"{host.name} has failed VM {vm} over (state {rel.state}): it runs "
                       f"there, and {peer['name']} may not replicate over it",
                       hint=f"decide which copy lives: cancel the failover on {host.name} "
                            f"(`vmreplica failover {vm} --cancel`), or make {peer['name']}'s "
                            "copy the replica")
    if rel.peer != peer["name"]:
        old = rel.peer
        host.store.update_relationship(vm, peer=peer["name"], peer_address=peer.get("address"),
                                       epoch=rel.epoch + 1)
        rel = host.store.relationship(vm)
        host.event("dr", f"the replication of {vm} moved from {old} to {peer['name']} with "
                         f"the VM (epoch {rel.epoch}): {old} is refused from now on", vm)
    return {"vm": vm, "id": rel.id, "epoch": rel.epoch, "state": rel.state,
            "disks": rel.disks, "frequency": rel.frequency,
            "history": rel.history, "point_interval": rel.point_interval,
            "security_tag": rel.security_tag, "holders": holders,
            "last_applied_cycle": rel.last_applied_cycle}


class _Tee:
    """``read(n)`` from the request body, copying every byte read into the staging file."""

    def __init__(self, read, sink):
        self._read, self._sink = read, sink
        self.bytes = 0

    def read(self, n: int) -> bytes:
        piece = self._read(n)
        if piece:
            self._sink(piece)
            self.bytes += len(piece)
        return piece


KEEP_IN_MEMORY = 256 << 20  # a staged delta up to this size is applied from memory


def receive_cycle(host, peer: dict, vm: str, body) -> dict:
    """Receive one cycle. A delta is verified and staged durably, then applied, then
    acknowledged, then its heads are synced (replica.checkpoint); an initial copy
    (nothing consistent to protect yet) is applied as it streams in, and the replica
    counts as seeded only once all of it is verified and synced."""
    rel = checks.own_relationship(host, peer, vm)
    reader = wire.CycleReader(body.read, pool=POOL)
    header = reader.start()
    cycle = checks.check_header(host, rel, header)
    kind = "initial" if header.get("initial") else "resync" if header.get("resync") else "delta"
    lock = host.vm_lock(vm)
    # An initial copy or a resync rewrites the heads whatever they hold: it does not wait
    # for a staged cycle that cannot be applied (it supersedes it, below).
    with (lock if kind == "delta" else lock.as_is()):
        # A cycle means the primary is catching up (continuous mode dropped to cycles).
        mirror.close_target(host, vm)
        row = host.store.start_cycle(vm, cycle, kind)   # the replica's cycle history
        try:
            if kind == "delta":
                result = _receive_delta(host, vm, cycle, reader, body)
            else:
                result = receive_initial(host, vm, cycle, reader)
        except Exception as e:
            host.store.finish_cycle(row, False, error=getattr(e, "message", None) or str(e))
            raise
        with host.store.unsynced():      # history (see _apply)
            host.store.finish_cycle(row, True, reader.raw_bytes, reader.bytes_read,
                                    result.get("records", 0))
        return result


def receive_initial(host, vm: str, cycle: int, reader: wire.CycleReader) -> dict:
    """An initial copy (into emptied heads) or a resynchronisation (only the blocks that
    differ, onto what the heads hold): applied as it streams; the relationship stays in
    waiting_for_initial / resynchronizing until all of it is verified and applied."""
    rel = host.store.relationship(vm)
    assert reader.header is not None                # (started by the caller)
    resync = bool(reader.header.get("resync"))
    waiting = State.RESYNCHRONIZING.value if resync else State.WAITING_FOR_INITIAL.value
    if rel.state != waiting:
        host.store.set_state(vm, waiting)
    t0 = time.monotonic()
    heads = rstore.heads(rel.chains, rel.disks)
    host.store.update_relationship(vm, index_valid=False)
    if not resync:
        host.heads.close(vm)
        rstore.reset_heads(heads)
        for d, h in zip(rel.disks, heads, strict=False):
            rindex.init(rindex.path(Path(rel.storage), vm, d), int(img.info(h)["virtual-size"]))
    # Records are taken off the connection and verified on a thread of their own while
    # the previous ones are written: an initial copy streams gigabytes, and one thread
    # doing both left the primary's sends waiting while it waited on the head server.
    # (A reader waiting on the connection when the apply fails ends with the request.)
    records = ahead(reader.records(), depth=16, name="receive-ahead", join_timeout=2)
    stats = _apply_with(host, vm, heads, records, bool(reader.header.get("verify")),
                        direct=True)
    host.store.update_relationship(vm, index_valid=True)
    _applied(host, vm, cycle, reader.header, reader.trailer)
    # Staged deltas that could not be applied are superseded: the heads now hold the
    # primary's newer point whole.
    stale = host.store.staged(vm)
    for row in stale:
        Path(row["path"]).unlink(missing_ok=True)
        host.store.remove_staged(vm, row["cycle"])
    unapplied.clear(host, vm, [])
    host.event("resync" if resync else "initial",
               f"{'resynchronization' if resync else 'initial copy'} received: "
               f"{format_size(stats['bytes'])} in {stats['records']} records", vm)
    return {"vm": vm, "cycle": cycle, "applied": True, "records": stats["records"],
            "apply_seconds": round(time.monotonic() - t0, 4),
            **_manifest(rel, stats)}


def _manifest(rel: Relationship, stats: dict) -> dict:
    if "manifest" not in stats:
        return {}
    return {"manifest": dict(zip(rel.disks, stats["manifest"], strict=False))}


def _receive_delta(host, vm: str, cycle: int, reader: wire.CycleReader, body) -> dict:
    sdir = host.home.staging / vm
    sdir.mkdir(parents=True, exist_ok=True)
    part = sdir / f"incoming-{cycle:08d}-{time.monotonic_ns()}.part"
    kept: list[wire.Record] | None = []
    t_start = time.monotonic()
    # While the stream comes in, the heads leave the page cache: whatever read them since
    # the last cycle (a backup, a compare, a test failover) would otherwise make this
    # cycle's writes 3-4x slower (qemutools.img.drop_cached_pages). Off this thread: it
    # costs up to 0.1 s for a head read whole, and the receive mostly waits on the primary.
    rel = host.store.relationship(vm)
    settle = img.drop_cached_pages_later(*rstore.heads(rel.chains, rel.disks),
                                         name=f"uncache-{vm}")
    try:
        with open(part, "wb") as f:
            # The staged file is the stream exactly as received: the header, then every
            # record as it is read and verified, then the end frame.
            f.write(reader.head_bytes)
            reader._read = _Tee(body.read, f.write).read
            for rec in reader.records():
                if kept is not None:
                    kept.append(rec)
                    if reader.raw_bytes > KEEP_IN_MEMORY:
                        kept = None  # too large to hold: apply from the staged file
            t_recv = time.monotonic()
            f.flush()
            os.fsync(f.fileno())
        final = sdir / f"cycle-{cycle:08d}.stage"
        os.replace(part, final)
        _fsync_dir(sdir)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        settle.join()
    host.store.add_staged(vm, cycle, str(final))
    t_staged = time.monotonic()
    # Synced after the ack (replica.checkpoint) unless the cycle makes a recovery point
    # (a point freezes the head as it is on disk) or is a planned failover's last.
    # (--verify reads the heads whole anyway.)
    trailer = reader.trailer or {}
    assert reader.header is not None                # (started by the caller)
    durable = bool(trailer.get("point") or trailer.get("final") or reader.header.get("verify"))
    try:
        result = _apply(host, vm, cycle, final, kept, reader.trailer, reader.header,
                        durable=durable)
    except BaseException as e:  # noqa: BLE001 — re-raised, marked: whatever stopped the apply
        # The heads hold part of the cycle: nothing reads them until the staged copy has
        # been applied whole (unapplied.mark; the VM's lock redoes it first).
        raise unapplied.mark(host, vm, cycle, final, e) from None
    for rec in kept or ():
        POOL.put(rec.payload)      # applied and flushed: the next cycle's buffers
    result.update(receive_seconds=round(t_recv - t_start, 4),
                  stage_seconds=round(t_staged - t_recv, 4),
                  apply_seconds=round(time.monotonic() - t_staged, 4))
    return {"vm": vm, "cycle": cycle, "applied": True, **result}


SYNC_STATES = (None, "catching_up", "in_sync", "degraded", "idle")


def apply_settings(host, peer: dict, vm: str, body: dict) -> dict:
    """The primary changed settings that the replica applies (retention history), or
    tells it its replication mode and continuous sub-state (shown here as they are there)."""
    rel = checks.own_relationship(host, peer, vm)
    if "mode" in body:
        return _apply_mode(host, vm, body)
    from ..domain import points as dp
    history = dp.validate_history(_field(body, "history", int, rel.history,
                                         high=_BIG))
    interval = _field(body, "point_interval", int, rel.point_interval, low=1,
                      high=_BIG)
    with host.vm_lock(vm):
        host.store.update_relationship(vm, history=history, point_interval=interval)
        if rel.state == State.REPLICATING.value:
            points.retain(host, vm)
    return {"vm": vm, "history": history}


def _apply_mode(host, vm: str, body: dict) -> dict:
    mode = body.get("mode")
    if mode not in ("periodic", "continuous"):
        raise UsageError(f"unknown mode {str(mode)[:20]!r}")
    sync = body.get("sync_state")
    if sync not in SYNC_STATES or (sync is not None and mode != "continuous"):
        raise UsageError(f"unknown continuous sub-state {str(sync)[:20]!r}")
    reason = body.get("sync_reason")
    if reason is not None and not isinstance(reason, str):
        raise UsageError("sync_reason must be a string")
    changes = {"mode": mode, "sync_state": sync, "sync_reason": reason and reason[:500],
               "sync_since": _field(body, "sync_since", float, None, low=0)}
    if body.get("max_stall") is not None:
        changes["max_stall"] = _field(body, "max_stall", float, DEFAULTS.max_stall, low=0.5,
                                      high=120)
    host.store.update_relationship(vm, **changes)
    return {"vm": vm, "mode": mode, "sync_state": sync}


def change_disks(host, peer: dict, vm: str, body: dict) -> dict:
    """The primary replicates another set of disks: drop the chains of the ones it no
    longer sends; give new ones an empty chain as deep as the others (so every recovery
    point is still the same layer on every disk; the new disk reads as zeros in older
    points, which predate its replication)."""
    rel = checks.own_relationship(host, peer, vm)
    wanted = body.get("disks") or []
    if not isinstance(wanted, list) or not all(isinstance(d, dict) for d in wanted):
        raise UsageError("disks must be a list of objects")
    names = [safe_name(d.get("name"), "disk") for d in wanted]
    if not names or len(set(names)) != len(names):
        raise UsageError("disks must name each replicated disk once")
    for d in wanted:
        if d["name"] not in rel.chains:
            _field(d, "virtual_size", int, 0, low=1, high=1 << 55)
    with host.vm_lock(vm):
        host.heads.close(vm)
        chains = dict(rel.chains)
        depth = len(next(iter(chains.values())))
        storage = Path(rel.storage)
        for d in wanted:
            if d["name"] not in chains:
                chains[d["name"]] = rstore.new_chain(storage, vm, d, depth)
        dropped = [p for name, c in chains.items() if name not in names for p in c]
        chains = {n: chains[n] for n in names}
        host.driver.replace_disks(vm, [dict(d, path=chains[d["name"]][-1], format="qcow2")
                                       for d in wanted])
        host.store.update_relationship(vm, chains=chains, disks=names, index_valid=False)
        rstore.drop_layers(dropped)
        for name in rel.disks:
            if name not in names:
                rindex.path(storage, vm, name).unlink(missing_ok=True)
    host.event("relationship", "replicated disks now: " + ", ".join(names), vm)
    return {"vm": vm, "disks": names}


def point_now(host, peer: dict, vm: str, body: dict) -> dict:
    """Continuous mode: make a recovery point of what the mirror has written so far."""
    rel = checks.own_relationship(host, peer, vm)
    checks.check_primary(host, rel, _field(body, "epoch", int, 0, high=_BIG))
    from ..domain import points as dp
    kind = body.get("kind") or dp.CRASH
    if kind not in (dp.CRASH, dp.APP):
        raise UsageError(f"unknown recovery point kind {str(kind)[:20]!r}")
    when = _field(body, "time", float, 0, low=0) or time.time()
    with host.vm_lock(vm):
        made = points.create(host, vm, kind, when)
        host.store.update_relationship(vm, last_freeze_at=when)
    return made


def final_marker(host, peer: dict, vm: str, body: dict) -> dict:
    """Continuous mode, planned failover: the primary's VM is off and every write it
    acknowledged reached this replica through the mirror — no final cycle needed."""
    rel = checks.own_relationship(host, peer, vm)
    checks.check_primary(host, rel, _field(body, "epoch", int, 0, high=_BIG))
    with host.vm_lock(vm):
        mirror.close_target(host, vm)
        host.store.update_relationship(
            vm, primary_prepared={"cycle": rel.last_applied_cycle,
                                  "at": time.time(), "mirror": True},
            last_freeze_at=time.time())
    host.event("failover", "the primary is prepared (continuous mode: every acknowledged "
                           "write is here)", vm)
    return {"vm": vm, "prepared": True}


def state_for_primary(host, peer: dict, vm: str, epoch: int) -> dict:
    rel = checks.own_relationship(host, peer, vm)
    checks.check_primary(host, rel, epoch)
    return {"vm": vm, "state": rel.state, "epoch": rel.epoch,
            "last_applied_cycle": rel.last_applied_cycle}


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply(host, vm: str, cycle: int, path: Path, records=None, trailer=None,
           header: dict | None = None, durable: bool = True, direct: bool = False) -> dict:
    """Apply staged cycle ``path`` (from ``records`` if they are still in memory). Not
    ``durable``: the hash index is synced and the stage dropped after the ack
    (replica.checkpoint). ``direct``: O_DIRECT heads (a redo after a failure)."""
    rel = host.store.relationship(vm)
    heads = rstore.heads(rel.chains, rel.disks)
    if records is None:
        with open(path, "rb") as f:
            reader = wire.reader_for_file(f)
            header = reader.start()
            stats = _apply_with(host, vm, heads, reader.records(), bool(header.get("verify")),
                                durable, direct)
            trailer = reader.trailer
    else:
        stats = _apply_with(host, vm, heads, records, bool(header and header.get("verify")),
                            durable, direct)
    if durable:
        _applied(host, vm, cycle, header, trailer)
        host.store.remove_staged(vm, cycle)
        path.unlink(missing_ok=True)
    else:
        # Any fsync now would wait for the disk to take the cycle's writes (it flushes
        # the disk's cache): the record waits for the checkpoint's, the stage redoes it.
        with host.store.unsynced():
            _applied(host, vm, cycle, header, trailer)
        checkpoint.defer(host, vm, cycle, path, heads,
                         [str(rindex.path(Path(rel.storage), vm, d)) for d in rel.disks])
    return {"records": stats["records"], "bytes": stats["bytes"],
            "write_seconds": stats["write_seconds"], "flush_seconds": stats["flush_seconds"],
            **_manifest(rel, stats)}


def _applied(host, vm: str, cycle: int, header: dict | None, trailer: dict | None) -> None:
    rel = host.store.relationship(vm)
    trailer = trailer or {}
    changes = {"last_applied_cycle": cycle, "last_applied_at": time.time(),
               "last_freeze_at": trailer.get("freeze_time"),
               "epoch": max(rel.epoch, int(trailer.get("epoch", 0)))}
    state = None
    if rel.state in (State.WAITING_FOR_INITIAL.value, State.RESYNCHRONIZING.value):
        state = State.REPLICATING
        changes["replicating_since"] = rel.replicating_since or time.time()
    # Only the primary's final cycle (VM off, prepared) allows a planned failover; any
    # later cycle means the primary runs again.
    changes["primary_prepared"] = {"cycle": cycle, "at": time.time()} if trailer.get("final") \
        else None
    if trailer.get("point") and rel.last_applied_cycle < cycle:
        # Recorded with the cycle, made right after: a crash in between makes it at start-up.
        changes["pending_point"] = {"kind": trailer["point"], "time": trailer.get("freeze_time")}
    if state is None:
        host.store.update_relationship(vm, **changes)
    else:
        host.store.set_state(vm, state, why=f"cycle {cycle} applied", **changes)
    make_pending_point(host, vm)


def make_pending_point(host, vm: str) -> None:
    rel = host.store.relationship(vm)
    pending = rel.pending_point
    if pending:
        points.create(host, vm, pending["kind"], pending["time"] or time.time())
        host.store.update_relationship(vm, pending_point=None)


def _apply_with(host, vm: str, heads: list[str], records, verify: bool,
                durable: bool = True, direct: bool = False) -> dict:
    """Write ``records`` into ``heads``; ``direct`` for an initial copy's or a resync's
    bulk writes (replica.heads.HeadServer)."""
    rel = host.store.relationship(vm)
    server = host.heads.get(vm, heads, direct)
    try:
        paths = [rindex.path(Path(rel.storage), vm, d) for d in rel.disks]
        idx = rindex.IndexWriter(paths, [w.size for w in server.writers])
        stats = applier.apply_records(records, server, verify=verify, index=idx,
                                      durable=durable)
        # A verification read every head: the index takes what was read, so a head
        # changed behind vmreplica's back (what a failed verification finds) is repaired
        # by the resync that follows instead of being hidden by a stale index.
        for p, digests in zip(paths, stats.pop("digests", []), strict=False):
            rindex.write(p, digests)
        return stats
    except StorageFull as e:
        host.heads.close(vm)
        raise StorageFull(f"the replica storage {rel.storage} on {host.name} is full "
                          f"({e.message}); the cycle was not applied and the primary keeps "
                          "its changes",
                          hint=f"free space or grow {rel.storage} on {host.name}: the next "
                               "cycle sends the changes again") from None
    except BaseException:
        host.heads.close(vm)  # writes in an unknown state: start afresh next time
        raise


def recover(host) -> list[tuple[str, int]]:
    """Start-up: re-apply every cycle that was staged but not checkpointed, VM by VM. A VM
    whose recovery fails is left in ``error`` with its reason (or, when its storage is
    full, with its stage kept for a later redo): the others start regardless."""
    redone = []
    vms = list(dict.fromkeys(row["vm"] for row in host.store.staged()))
    for vm in vms:
        if host.store.relationship(vm) is None:
            for row in host.store.staged(vm):
                Path(row["path"]).unlink(missing_ok=True)
                host.store.remove_staged(vm, row["cycle"])
            continue
        try:
            redone += [(vm, c) for c in redo_unapplied(host, vm, at_start=True)]
        except Exception as e:  # noqa: BLE001 — one VM's failure stops no other
            log.exception("start-up recovery of %s failed", vm)
            unapplied.failed_at_start(host, vm, e)
    for rel in host.store.relationships():
        if rel.apply_pending:
            host.unapplied.add(host.lock_key(rel.vm))
    _reconcile_disks(host)
    try:
        points.finish_merges(host)
    except Exception:  # noqa: BLE001
        log.exception("finishing interrupted merges failed")
    for rel in host.store.relationships():
        if rel.pending_point and rel.vm not in host.unapplied:
            try:
                make_pending_point(host, rel.vm)
            except Exception as e:  # noqa: BLE001
                log.exception("the pending recovery point of %s failed", rel.vm)
                host.event("recovery", f"the recovery point recorded with the last cycle "
                                       f"could not be made: {e}", rel.vm)
    # Leftover partial uploads were never acknowledged: drop them.
    if host.home.staging.exists():
        for part in host.home.staging.glob("*/*.part"):
            part.unlink(missing_ok=True)
    return redone


def _reconcile_disks(host) -> None:
    """Start-up: every replica VM's disks point at its chains' heads. The state store's
    chains are the truth (committed with the point that changed them); the VM's own
    definition is written after that commit (the qemu driver's vm.json, libvirt's domain
    XML), so a power cut in between left it naming a frozen layer (found by the crash
    states of a recovery point's rotation): a later `remove --keep-replica` would then
    have kept the point and lost every cycle after it."""
    for rel in host.store.relationships():
        if rel.role != Role.REPLICA.value or not rel.chains or rel.failover \
                or rel.state == State.FAILED_OVER.value:
            continue
        vm = rel.vm
        want = {d: c[-1] for d, c in rel.chains.items()}
        try:
            have = {d.name: d.path for d in host.driver.inspect(vm).disks}
            wrong = {d: p for d, p in want.items() if d in have and have[d] != p}
            if wrong:
                host.driver.set_disks(vm, wrong)
                host.event("recovery", "the replica VM's disks named older layers after an "
                                       "unclean stop; they point at the heads again: " +
                           ", ".join(f"{d} -> {p}" for d, p in wrong.items()), vm)
        except Exception as e:  # noqa: BLE001 — one VM's trouble stops no other
            log.warning("could not check the disks of replica VM %s: %s", vm, e)


def redo_unapplied(host, vm: str, at_start: bool = False) -> list[int]:
    """Apply every staged cycle of ``vm`` again, whole, as after a crash (replica.unapplied):
    heads closed, dropped from the page cache, repaired, then each cycle written with
    O_DIRECT and synced before it is recorded. Under the VM's lock, or at start-up.
    Returns the cycles applied; raises when one fails (its stage stays, the VM stays
    marked). Stage files that went missing make the relationship need a resync."""
    rows = host.store.staged(vm)
    if any(not Path(r["path"]).exists() for r in rows):
        # A later cycle cannot be applied over a lost one: the resync covers them all.
        for r in rows:
            Path(r["path"]).unlink(missing_ok=True)
        unapplied.lost(host, vm, [r["cycle"] for r in rows])
        unapplied.clear(host, vm, [])
        return []
    if not rows:
        unapplied.clear(host, vm, [])
        return []
    rel = host.store.relationship(vm)
    host.heads.close(vm)
    img.drop_cached_pages(*rstore.heads(rel.chains, rel.disks))
    repair_heads(host, vm)
    done = []
    for row in rows:
        log.warning("re-applying staged cycle %s of %s (%s)", row["cycle"], vm,
                    "after a restart" if at_start else "after a failed apply or checkpoint")
        _apply(host, vm, row["cycle"], Path(row["path"]), durable=True, direct=True)
        done.append(row["cycle"])
    host.event("recovery", f"re-applied staged cycle{'s' if len(done) > 1 else ''} "
                           f"{', '.join(map(str, done))} "
                           f"{'after a restart' if at_start else 'after a failed apply or sync'}",
               vm)
    unapplied.clear(host, vm, done)
    return done


def repair_heads(host, vm: str) -> None:
    """Before a staged cycle is applied again (at start-up, or after a failed apply or
    checkpoint): the heads' qcow2 metadata checked and made consistent. The head server
    keeps qcow2's flushes, so qcow2's own write ordering holds whatever a power cut left
    (heads.HeadServer); ``qemu-img check -r all`` then only frees leaked clusters (and
    would rebuild refcounts left behind an L2 entry). What the tables lost (a new
    cluster or L2 table not on the disk) reads from the layer below until the re-apply,
    which writes every extent of the cycle again. A head ``qemu-img check`` cannot
    repair raises (HypervisorError): that VM goes to ``error``."""
    rel = host.store.relationship(vm)
    host.heads.close(vm)
    for head in rstore.heads(rel.chains, rel.disks):
        report = img.repair(head)
        fixed = int(report.get("corruptions-fixed", 0)) + int(report.get("leaks-fixed", 0))
        if fixed:
            host.event("recovery", f"{head}: qemu-img check repaired {fixed} refcount "
                                   "error(s) left by an unclean stop", vm)


def remove_relationship(host, vm: str, keep_replica: bool, tell_primary: bool = False) -> dict:
    """End the replica side. ``tell_primary`` (`remove` run here): the primary ends its
    side first; if it cannot be reached a tombstone answers its next call (see
    replica.removal). ``keep_replica``: the VM stays, on standalone copies of its disks in
    ``STORAGE/VM.kept`` (the existing-copy seed of a later relationship)."""
    from . import removal
    rel = host.store.relationship(vm)
    if rel is None or rel.role != Role.REPLICA.value:
        raise NotFound(f"{host.name} holds no replica of VM {vm}")
    if rel.state == State.FAILOVER_IN_PROGRESS.value:
        raise Conflict(f"a failover of {vm} to {host.name} is in progress",
                       hint=f"complete it (`vmreplica failover {vm} --complete`) or cancel it "
                            "(`--cancel`) first")
    # A VM that failed over to this host is the VM now (its chain was merged onto disks
    # of its own first, service.operations.remove): replication ends, the VM stays.
    failed_over = rel.state == State.FAILED_OVER.value
    told, primary_side = removal.tell_primary(host, rel, keep_replica) if tell_primary \
        else (True, None)
    if keep_replica:
        try:            # what it keeps holds no part of a cycle (the VM's lock redoes it)
            with host.vm_lock(vm):
                pass
        except Exception as e:  # noqa: BLE001 — kept as is; the existing-copy seed evens it
            log.warning("keeping the replica of %s without its unapplied cycle: %s", vm, e)
    kept = None
    with host.vm_lock(vm).as_is():      # whatever its heads hold, they go
        mirror.close_target(host, vm)
        host.heads.close(vm)
        host.unsynced.pop(host.lock_key(vm), None)
        host.unapplied.discard(host.lock_key(vm))
        removed_vm = False
        try:
            info = host.driver.inspect(vm)
            if failed_over:
                pass                    # it runs here now, on its own disks: it stays
            elif keep_replica:
                if info.state == "running":
                    host.driver.stop(vm, force=True)
                kept = removal.keep(host, vm, rel)
            else:
                if info.state == "running":
                    host.driver.stop(vm, force=True)
                host.driver.delete(vm)
                removed_vm = True
        except NotFound:
            pass
        if not failed_over and (not keep_replica or kept is not None):
            rstore.delete_chains(Path(rel.storage), vm)
        for p in (host.home.staging / vm).glob("*"):
            p.unlink(missing_ok=True)
        try:
            (host.home.staging / vm).rmdir()
        except OSError:
            pass
        host.store.remove_relationship(vm)
        if not told:
            removal.bury(host, rel)
    host.event("relationship", f"replica of {vm} removed"
               + (" (it failed over to here: the VM stays, on its own disks)" if failed_over
                  else f" (VM kept, its disks in {kept})" if kept is not None else
                  " (VM and disks kept)" if keep_replica else "")
               + (f"; {primary_side}" if primary_side else ""), vm)
    return {"vm": vm, "removed_vm": removed_vm, "kept": keep_replica,
            "kept_copy": str(kept) if kept is not None else None,
            "primary_side": primary_side}
