"""One replication cycle of one relationship: freeze → read changed extents → ship → ack → release.

The tracking point (the old bitmap) is released only after the replica has acknowledged
the cycle and the new point is recorded in the state store; any failure before that
folds the new bitmap back into the old one, so the next cycle ships everything again
(invariant 3).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..domain import extents as ex
from ..domain import points as dp
from ..domain import tracking as dtracking
from ..domain.links import is_dr, vm_name
from ..domain.relationship import Relationship
from ..domain.schedule import unscheduled_cover
from ..domain.states import State
from ..domain.units import format_size
from ..errors import (
    IntegrityError,
    OperationError,
    Removed,
    Superseded,
    TrackingError,
    Unreachable,
)
from ..qemutools.buffers import POOL
from ..qemutools.qsd import QuitTimeout
from ..tracking.bitmap import bitmap_prefix
from ..transport import wire
from ..transport.ahead import ahead
from .standing import check_peer, end_removed_later, fence

log = logging.getLogger("vmreplica.primary")

SEND_BATCH = 1 << 20      # wire bytes per send
SEND_RAW = 1 << 20        # ...or this much disk data covered, so well-compressed data
                          # streams while it is read instead of arriving all at the end


def bitmap_name(rel: Relationship, cycle: int) -> str:
    return f"{bitmap_prefix(rel.id)}{cycle}"


MODES = ("initial", "delta", "resync")


def run_cycle(host, vm: str, mode: str = "delta", verify: bool = False,
              final: bool = False, export_to=None, slot: float | None = None) -> dict:
    """Run one cycle of ``vm`` now; returns figures; raises on failure.

    ``mode``: ``initial`` (allocated data onto empty heads), ``delta`` (the extents the
    tracking bitmap marked; on disks that hold no bitmap — domain.tracking.SCAN, per the
    driver — the blocks whose digests differ from the replica's hash index), ``resync``
    (the blocks whose digests differ from the replica's, whatever the bitmaps say). Each starts a new tracking bitmap. With
    ``export_to`` (initial only) the stream goes to that file instead of the replica: a
    seed for removable media, imported on the replica with `initial VM --import`.

    With ``verify`` the replica returns the block digests of its heads after the apply
    and they are compared with the frozen point's before it is released.

    ``slot``: the due time of the slot the scheduler runs this cycle for (None: run
    outside the schedule). A scheduled cycle whose slot a cycle run meanwhile stands for
    (it waited for the VM's lock behind a manual sync) does not run: ``{"skipped": True}``.
    """
    store = host.store
    name = vm_name(vm)        # ``vm`` is the relationship's key: NAME, or NAME@dr
    with host.vm_lock(vm), _running(host, vm, mode) as op:
        rel = store.relationship(vm)
        if slot is not None and rel.unscheduled_until is not None and \
                slot < rel.unscheduled_until - 1e-3:
            return {"vm": vm, "skipped": True, "slot": slot}
        initial = mode == "initial"
        cycle = rel.cycle + 1
        op.label = _label(mode, cycle, final, export_to)
        since = rel.bitmap if mode == "delta" else None
        new = bitmap_name(rel, cycle)
        tracker = host.tracker(rel.tracker)
        disks = list(rel.disks)
        how = host.driver.disk_tracking(name)
        scanned = dtracking.scanned(how, disks) if mode == "delta" else []
        row = store.start_cycle(vm, cycle, mode, slot=slot)
        t0 = time.monotonic()
        clock = Phases(t0)
        stats: dict = {"vm": vm, "cycle": cycle, "initial": initial, "mode": mode,
                       "phases": clock.phases}
        try:
            if mode == "delta" and not since:
                raise TrackingError(f"{vm} has no change-tracking point")
            remote = None
            if mode == "resync" or scanned:
                op.phase = f"{rel.peer} reads its copy for the block digests"
                remote, stats["replica_read_bytes"] = _remote_manifest(
                    host, rel, name, scanned if mode == "delta" else None)
            op.phase = "freezing the disks"
            committed: list[bool] = []
            client = None
            if export_to is None:
                # Connected while the disks freeze: the handshakes cost the cycle nothing.
                client = host.client_for_peer(rel.peer, timeout=600)
                client.connect_ahead()
            clock.mark("start (peer connection begun)")
            with _session(host, vm, cycle, name, committed) as session, _discard(client):
                clock.mark("open the block session")
                tracked = [d for d in disks if d not in scanned]
                if since and tracked:
                    tracker.prepare(session, tracked, since, bitmap_prefix(rel.id))
                clock.mark("check the tracking point")
                kind = _recovery_point_kind(rel, time.time())
                thaw = kind == dp.APP and freeze_guest(host, name, session.running)
                if kind == dp.APP and not thaw:
                    kind = dp.CRASH
                point: Any      # (tracking.base.Point: a bitmap, scan or mixed point)
                try:
                    if mode == "resync":
                        from ..tracking.scan import ScanPoint
                        point = ScanPoint(session, disks, new, remote or {})
                    elif remote is not None:     # a delta with scan-tracked disks
                        from ..tracking.mixed import MixedPoint
                        point = MixedPoint(session, disks, since, new, remote)
                    else:
                        point = tracker.point(session, disks, since, new)
                    point.hold_pause = verify    # a live view is verified paused
                    freeze_time = time.time()
                    nvram = read_nvram(host.driver.nvram_path(name))
                finally:
                    if thaw:
                        thaw_guest(host, name)
                stats["freeze_seconds"] = round(time.monotonic() - t0, 4)
                clock.mark("freeze: view, new point, NBD connect, block status")
                t_ship = time.monotonic()
                try:
                    if mode == "delta":
                        _check_bound(point, rel)
                    _measure(op, point, export_to is None)
                    answer, writer = _ship(host, rel, name, cycle, mode, disks, point,
                                           freeze_time, verify, kind, final, export_to,
                                           client, nvram)
                    if verify:
                        op.phase = "verifying the replica"
                    differs = _verify(point, disks, answer) if verify else []
                    session.end_pause()
                    clock.mark("read, ship, replica stages + acks (a point: applies first)")
                except BaseException:
                    point.close()
                    try:
                        point.abort()
                    except Exception:  # noqa: BLE001 — the next cycle's prepare folds it in
                        log.exception("could not fold the tracking point back for %s", vm)
                    raise
                point.close()
                clock.mark("end the frozen view")
                paused = session.paused_seconds
                if paused:
                    # (continuous mode holds the disks: the frozen view was the paused guest)
                    stats["guest_paused_seconds"] = round(paused, 4)
                    host.event("cycle", f"cycle {cycle} read the disks live (the continuous "
                                        "mirror rules out fleecing) and paused the guest "
                                        f"{paused:.3f} s for the blocks written meanwhile", vm)
                # Record the new point first, then release the old one: a crash in between
                # leaves an extra bitmap (folded in by the next cycle), never a lost write.
                if kind:
                    store.update_relationship(vm, last_point_at=freeze_time,
                                              points_made=rel.points_made + 1)
                store.update_relationship(vm, cycle=cycle, bitmap=point.tracking,
                                          bitmap_next=None, disk_tracking=how,
                                          scan_costs=_scan_costs(rel, how, point,
                                                                 freeze_time),
                                          last_success_at=freeze_time,
                                          last_cycle_at=time.time(),
                                          consecutive_failures=0, last_error=None,
                                          last_error_code=None, last_error_hint=None)
                clock.mark("record the new point")
                point.commit()
                committed.append(True)
                clock.mark("release the old point")
                if mode != "delta":
                    # A fresh start: whatever tracking this relationship had is superseded.
                    stale = tracker.owned(session, disks, bitmap_prefix(rel.id)) - \
                        {point.tracking}
                    if stale:
                        session.release(disks, sorted(stale))
            if differs:
                store.set_state(vm, State.RESYNC_REQUIRED, why="verification failed")
                raise IntegrityError(
                    f"verification failed: the replica differs from the frozen point in "
                    f"{len(differs)} block(s) ({', '.join(differs[:5])})",
                    hint="a resynchronization is required")
            stats.update(raw_bytes=writer.raw_bytes, zero_bytes=writer.zero_bytes,
                         wire_bytes=writer.wire_bytes, records=writer.records,
                         replica={k: v for k, v in answer.items() if k != "manifest"},
                         verified=verify, ship_seconds=round(time.monotonic() - t_ship, 4),
                         compared_bytes=point.compared,
                         tracking=how, scanned={d: c for d, c in point.costs.items()
                                                if how.get(d) == dtracking.SCAN})
        except Exception as e:
            _failed(host, vm, cycle, row, e)
            raise
        clock.mark("close the block session")
        stats["seconds"] = round(time.monotonic() - t0, 4)
        store.finish_cycle(row, True, stats["raw_bytes"], stats["wire_bytes"], stats["records"])
        ended = time.time()
        cover = {} if slot is not None or export_to is not None else \
            {"unscheduled_until": unscheduled_cover(mode, ended, rel.frequency)}
        store.update_relationship(vm, last_attempt_at=ended,
                                  last_cycle_seconds=stats["seconds"], **cover)
        return stats


class Phases:
    """Where a cycle's time goes: [phase, seconds] in order (``--json``'s ``phases``;
    bench/bench_libvirt_cycle.py prints them)."""

    def __init__(self, t0: float):
        self.phases: list[list] = []
        self._last = t0

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append([phase, round(now - self._last, 4)])
        self._last = now


@contextlib.contextmanager
def _session(host, vm: str, cycle: int, name: str, committed: list):
    """The cycle's block session. A storage daemon that had to be killed when the session
    closed, once the cycle was committed, costs the change tracking (its bitmaps were not
    stored: the next cycle finds them missing or in use and resynchronises), not the
    cycle, which the replica has."""
    try:
        with host.driver.block_session(name) as session:
            yield session
    except QuitTimeout as e:
        if not committed or e.__context__ is not None:
            raise               # (before the commit, or beside another error: not hidden)
        log.warning("cycle %d of %s: %s", cycle, vm, e.message)
        host.event("cycle", f"cycle {cycle} reached the replica, but {e.message}: its "
                            "change-tracking bitmaps are lost, the next cycle resynchronizes",
                   vm)


def _verify(point, disks: list[str], answer: dict) -> list[str]:
    """Blocks (``disk@offset``) where the replica's head differs from the frozen point."""
    from ..tracking import scan
    theirs = answer.get("manifest") or {}
    differs = []
    for disk in disks:
        h = point.allocation_handle(disk)
        ours = scan.manifest(h, h.get_size())
        other = scan.decode(theirs.get(disk, ""))
        if len(other) != len(ours):
            differs.append(f"{disk}: no manifest")
            continue
        n = scan.DIGEST
        differs += [f"{disk}@{i * scan.BLOCK // 1024}KiB" for i in range(len(ours) // n)
                    if ours[i * n:(i + 1) * n] != other[i * n:(i + 1) * n]]
    return differs


def _check_bound(point, rel: Relationship) -> None:
    """Pending changes over the bound: a resync (digest compare) ships less than the
    extents of such a bitmap would, and is what Hyper-V does on a log overflow."""
    total = sum(e.size for e in point.exports.values())
    bound = rel.pending_bound * total
    if point.dirty_bytes() > bound:
        raise TrackingError(f"pending changes ({format_size(point.dirty_bytes())}) are over the "
                            f"bound ({format_size(int(bound))}, {rel.pending_bound:.0%} "
                            "of the disks)")


class _NoOperation:
    """Where the host keeps no registry of running operations: records nothing."""

    def measure(self, *args) -> None:
        pass

    def __setattr__(self, name, value) -> None:
        pass


def _running(host, vm: str, mode: str):
    """The cycle, as a running operation of the host (``host.activity``): what `status`,
    the dashboard and the CLI's progress lines show while it runs."""
    registry = getattr(host, "activity", None)
    if registry is None:
        return contextlib.nullcontext(_NoOperation())
    return registry.running(vm, mode, _label(mode, None))


def _label(mode: str, cycle: int | None, final: bool = False, export_to=None) -> str:
    if export_to is not None:
        return "seed export"
    if mode == "initial":
        return "initial copy"
    if mode == "resync":
        return "resync"
    word = "final cycle" if final else "cycle"
    return word if cycle is None else f"{word} {cycle}"


def _measure(op, point, to_replica: bool) -> None:
    """The operation's progress from now on: bytes compared of the disks (a resync's
    digest comparison) or bytes read of the data to ship."""
    then = "the replica stores and applies it" if to_replica else "writing the seed"
    if point.compared is not None:          # a digest comparison (tracking.scan)
        op.phase = "comparing block digests and shipping the blocks that differ"
        op.measure(point, "compared", sum(e.size for e in point.exports.values()), then)
    else:
        op.phase = "reading and shipping"
        op.measure(point, "read_bytes", point.data_bytes(), then)


def _recovery_point_kind(rel: Relationship, now: float) -> str | None:
    """Whether this cycle makes a recovery point on the replica, and of which kind."""
    if not dp.point_due(rel.last_point_at, rel.point_interval, now,
                        rel.history):
        return None
    return dp.kind_for(rel.points_made, rel.app_every)


def freeze_guest(host, vm: str, running: bool) -> bool:
    """Ask the guest agent to quiesce the file systems; False (and an event) if it can't."""
    if not running:
        host.event("point", "the VM is off: the recovery point is crash-consistent", vm)
        return False
    try:
        host.driver.freeze_filesystems(vm)
        return True
    except OperationError as e:
        host.event("point", f"the guest agent did not freeze the file systems ({e.message}): "
                            "the recovery point is crash-consistent", vm)
        return False


def thaw_guest(host, vm: str) -> None:
    """Thaw what ``freeze_guest`` froze (an event if the agent does not answer)."""
    try:
        host.driver.thaw_filesystems(vm)
    except OperationError as e:  # the guest thaws by itself after its timeout
        host.event("point", f"the guest agent did not thaw: {e.message}", vm)


def _scan_costs(rel: Relationship, how: dict[str, str], point, at: float) -> dict:
    """The relationship's last scan cost of each scan-tracked disk, with this cycle's."""
    costs = {d: c for d, c in rel.scan_costs.items() if how.get(d) == dtracking.SCAN}
    for d, c in point.costs.items():
        if how.get(d) == dtracking.SCAN:
            costs[d] = dtracking.ScanCost(c["read"], c["compared"], c["moved"], at).to_dict()
    return costs


def _remote_manifest(host, rel: Relationship, vm: str,
                     disks: list[str] | None = None) -> tuple[dict[str, bytes], int]:
    """The replica's block digests (from its hash index) of ``disks`` (None: all), and
    how much it had to read."""
    from urllib.parse import quote

    from ..tracking import scan
    q = f"&disks={quote(','.join(disks))}" if disks is not None else ""
    answer = host.client_for_peer(rel.peer, timeout=3600).request(
        "GET", f"/v1/replica/relationships/{vm}/manifest?epoch={rel.epoch}{q}")
    if int(answer.get("block", 0)) != scan.BLOCK:
        raise OperationError(f"{rel.peer} hashes blocks of {answer.get('block')} bytes, "
                             f"this host {scan.BLOCK}", hint="run the same vmreplica version")
    return {d: scan.decode(v) for d, v in answer["disks"].items()}, int(answer.get("read_bytes", 0))


@contextlib.contextmanager
def _discard(client):
    try:
        yield
    finally:
        if client is not None:
            client.discard()


def _ship(host, rel: Relationship, vm: str, cycle: int, mode: str, disks: list[str], point,
          freeze_time: float, verify: bool = False, recovery_point: str | None = None,
          final: bool = False, export_to=None, client=None, nvram: dict | None = None):
    writer = wire.CycleWriter(
        {"vm": vm, "relationship": rel.id, "epoch": rel.epoch, "cycle": cycle,
         "initial": mode == "initial", "resync": mode == "resync", "disks": disks,
         "primary": host.name, "verify": verify,
         "id": uuid.uuid4().hex, "freeze_time": freeze_time},
        compression=rel.compression)
    if client is None and export_to is None:
        client = host.client_for_peer(rel.peer, timeout=600)
    times = {"start": time.monotonic()}
    body = _produce(writer, point, disks, {"cycle": cycle, "epoch": rel.epoch,
                                           "freeze_time": freeze_time,
                                           "initial": mode == "initial",
                                           "point": recovery_point, "final": final,
                                           **(nvram or {})},
                    times)
    if export_to is not None:
        answer = _write_seed(export_to, body, cycle)
    else:
        answer = client.request("POST", f"/v1/replica/relationships/{vm}/cycles", body)
    answer["ack_seconds"] = round(time.monotonic() - times["start"], 4)
    if "read_done" in times:
        answer["primary_read_seconds"] = round(times["read_done"] - times["start"], 4)
    if int(answer.get("cycle", -1)) != cycle:
        raise OperationError(f"the replica acknowledged cycle {answer.get('cycle')}, "
                             f"expected {cycle}")
    return answer, writer


NVRAM_MAX = 768 << 10      # packed, inside the trailer (transport.wire.MAX_HEADER: 1 MiB)


def read_nvram(path: str | None) -> dict | None:
    """The VM's UEFI variables for the cycle's trailer: {"nvram_hash": BLAKE3 hex,
    "nvram": base64 of their zstd} (a 540 KiB OVMF store compresses to about 2 KiB), or
    None when it has none. Read at the freeze; a running VM's firmware writes the file
    rarely (boot entries), and its variable store survives a torn copy the way it
    survives a power cut during a flash write (its fault-tolerant write log)."""
    if not path:
        return None
    import base64

    import blake3
    import zstandard
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None      # (not made yet: libvirt copies the template at the first start)
    packed = base64.b64encode(zstandard.ZstdCompressor(level=3).compress(data)).decode()
    if len(packed) > NVRAM_MAX:
        raise OperationError(f"the UEFI variable store {path} is too large to carry with a "
                             f"cycle ({len(packed) >> 10} KiB packed, at most "
                             f"{NVRAM_MAX >> 10} KiB)")
    return {"nvram_hash": blake3.blake3(data).hexdigest(), "nvram": packed}


def _write_seed(path, body, cycle: int) -> dict:
    import os
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        f.writelines(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"cycle": cycle, "exported": str(path)}


def _encode(writer: wire.CycleWriter, point, disks: list[str], trailer: dict) -> Iterator[bytes]:
    index = {d: i for i, d in enumerate(disks)}
    parts: list = [writer.begin()]
    held: list = []         # read buffers sent as they are: given back once joined
    size = raw = 0
    for chunk in point.chunks():
        i = index[chunk.disk]
        if chunk.kind == ex.DATA:
            frame, payload = writer.data_frame(i, chunk.offset, chunk.data)
            if payload is None:                   # it read as zeros: a ZERO record
                parts.append(frame)
                size += len(frame)
                POOL.put(chunk.data)
            else:
                parts += (frame, payload)
                size += len(frame) + len(payload)
                raw += chunk.length
                if payload is chunk.data:
                    held.append(chunk.data)
                else:
                    POOL.put(chunk.data)  # compressed: the read buffer is free again
        else:
            parts.append(writer.zero(i, chunk.offset, chunk.length, trim=chunk.kind == ex.TRIMMED))
            size += wire.FRAME.size
        if size >= SEND_BATCH or raw >= SEND_RAW:
            piece = b"".join(parts)
            parts, size, raw = [], 0, 0
            for b in held:
                POOL.put(b)
            held = []
            yield piece
    parts.append(writer.end(trailer))
    yield b"".join(parts)


def _produce(writer, point, disks, trailer, times: dict) -> Iterator[bytes]:
    """Read, checksum and compress on a second thread while this one sends (TLS)."""
    def encoded():
        yield from _encode(writer, point, disks, trailer)
        times["read_done"] = time.monotonic()
    return ahead(encoded(), depth=8, name="cycle-reader")


def _failed(host, vm: str, cycle: int, row: int, e: Exception) -> None:
    store = host.store
    msg = getattr(e, "message", None) or str(e)
    store.finish_cycle(row, False, error=msg)
    rel = store.relationship(vm)
    if isinstance(e, Removed):
        # The replica ended the relationship while this host could not be told: this
        # side ends too (on a thread of its own: this one holds the VM's lock).
        host.event("cycle", f"cycle {cycle} refused: {msg}", vm)
        end_removed_later(host, vm, rel.id, rel.peer)
        return
    failures = rel.consecutive_failures + 1
    changes = {"consecutive_failures": failures, "last_error": msg,
               "last_error_code": getattr(e, "code", "error"),
               "last_error_hint": getattr(e, "hint", None),
               "last_attempt_at": time.time()}
    state = None
    if isinstance(e, TrackingError):
        state = State.RESYNC_REQUIRED
        changes["resync_reason"] = msg
        if not e.hint:      # what the operator sees next: it mends by itself
            window = " (in its resync window)" if rel.resync_window else ""
            e.hint = (f"{vm} needs a resynchronization (only the blocks that differ move): "
                      f"it starts by itself{window}, or run `vmreplica resync {vm} --now`")
        host.event("tracking", f"change tracking broken: {msg}; resynchronization required", vm)
    elif isinstance(e, Superseded) and is_dr(vm):
        # Another host took the DR link over (the VM moved there): stand by, nothing fenced
        # (where the VM runs is its main relationship's business, or the cluster's).
        state = State.STANDBY
        host.event("dr", f"the DR link was taken over by another host: standing by ({msg})", vm)
    elif isinstance(e, Superseded):
        state = State.ERROR
        changes["fenced"] = f"{rel.peer} has become the primary ({msg})"
    if state is None:
        store.update_relationship(vm, **changes)
    else:                                       # the fence is recorded before the power-off
        store.set_state(vm, state, why=msg, **changes)
    if isinstance(e, Superseded) and not is_dr(vm):
        fence(host, vm)
    if not isinstance(e, (Superseded, Unreachable)):
        # The cycle may have failed before it reached the replica (a broken bitmap after a
        # crash, say): ask it whether this host is still the primary.
        try:
            check_peer(host, vm, timeout=5)
        except OperationError:
            pass
    host.event("cycle", f"cycle {cycle} failed: {msg}", vm)
    log.warning("cycle %d of %s failed: %s", cycle, vm, msg)
