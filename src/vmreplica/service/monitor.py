"""What operators watch: status, health with reasons (judged on the last 12 h of cycles
and configurable thresholds), Measure-VMReplication-style statistics, and the health
changes that become events. Read models for the CLI, the dashboard and /metrics.
Health and status read the store's running aggregates (Store.cycle_stats), never the
cycle rows: their cost per VM does not grow with the history."""

from __future__ import annotations

import time

from ..domain import tracking as dtracking
from ..domain.health import DEFAULT_THRESHOLDS, assess
from ..domain.history import hour_of, total
from ..domain.links import vm_name
from ..domain.reip import FailoverIP
from ..domain.relationship import Relationship
from ..domain.schedule import format_frequency
from ..domain.states import next_step
from ..errors import NotFound


def thresholds(host) -> dict:
    return dict(DEFAULT_THRESHOLDS, **(host.store.get_setting("health_thresholds") or {}))


def mode_label(rel: Relationship) -> str:
    """The MODE column, the same on both hosts: the frequency, or `cont:` and the
    continuous sub-state (the replica has it from the primary)."""
    if rel.mode == "periodic":
        return format_frequency(rel.frequency)
    return f"cont:{rel.sync_state or '-'}"


def _heads_written_at(rel: Relationship) -> float | None:
    """Replica side: when a head file last changed (the mirror writes straight into them)."""
    import os
    times = []
    for chain in rel.chains.values():
        try:
            times.append(os.stat(chain[-1]).st_mtime)
        except (OSError, IndexError):
            pass
    return max(times, default=None)


def continuous_figures(host, rel: Relationship, stats: dict, now: float) -> None:
    """Continuous mode: what the mirror means for last sync, lag and pending, the same
    on both hosts. In sync, the replica holds every write the guest saw acknowledged: lag
    0, nothing pending, and the last sync is the last write the mirror carried (the
    primary's watchdog sees the mirror's progress move; the replica, its heads change).
    Degraded, the replica has what it had when the mirror stopped. Catching up or idle
    (the VM off), cycles run: their figures stand."""
    stats["last_write_at"] = None
    if rel.mode != "continuous" or rel.state != "replicating":
        return
    sync = rel.sync_state
    if rel.role == "primary":
        written = host.continuous.last_write(rel.vm) if sync == "in_sync" else None
    else:
        written = _heads_written_at(rel)
    stats["last_write_at"] = written
    if sync == "in_sync":
        written = written or rel.sync_since
        stats["last_cycle_at"] = max(written or 0, stats.get("last_cycle_at") or 0) or None
        stats["lag_seconds"] = 0.0
        stats["pending_bytes"] = 0
    elif sync == "degraded" and rel.sync_since:
        stats["lag_seconds"] = max(0.0, now - float(rel.sync_since))


def view(host, rel: Relationship, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    stats = host.store.cycle_stats(rel, now)
    continuous_figures(host, rel, stats, now)
    health = assess(rel, now, stats, thresholds(host))
    return {
        "vm": rel.vm, "role": rel.role, "peer": rel.peer, "state": rel.state,
        "health": health.level, "reasons": health.reasons,
        "frequency": format_frequency(rel.frequency),
        "mode": rel.mode, "sync_state": rel.sync_state,
        "sync_reason": rel.sync_reason, "mode_label": mode_label(rel),
        "last_cycle_at": stats["last_cycle_at"], "lag_seconds": stats["lag_seconds"],
        "last_write_at": stats["last_write_at"],
        "cycle": rel.cycle if rel.role == "primary" else rel.last_applied_cycle,
        "epoch": rel.epoch, "last_error": rel.last_error,
        "disks": rel.disks, "fenced": rel.fenced, "next": next_step(rel),
        "test_vm": (rel.test or {}).get("vm"),
        "tracking": disk_tracking(host, rel),
        "failover_ips": [FailoverIP.from_dict(d).text() for d in rel.failover_ips],
        "reip": rel.reip,
        **_running(host, rel.vm), "resync_window": rel.resync_window,
        "tags": host.store.tags(vm_name(rel.vm)),
    }


def disk_tracking(host, rel: Relationship) -> list[dict]:
    """Primary side: how each replicated disk is tracked (domain.tracking), and what the
    last cycle's scan of a scan-tracked disk read and moved. (A relationship enabled
    before this was recorded asks the driver.)"""
    if rel.role != "primary":
        return []
    how = rel.disk_tracking
    if not how:
        try:
            how = host.driver.disk_tracking(vm_name(rel.vm))
        except Exception:  # noqa: BLE001 — a status line must not fail over it (VM gone)
            how = {}
    return [line.to_dict() for line in dtracking.disk_lines(rel.disks, how, rel.scan_costs)]


def _running(host, vm: str) -> dict:
    """``activity``: the operation running on relationship ``vm`` now (kind, label,
    phase, seconds, and while it moves data: done, total, percent, rate_bps,
    eta_seconds), else None; ``progress``: its {done, total}, else None."""
    registry = getattr(host, "activity", None)
    op = registry.of(vm) if registry is not None else None
    progress = {"done": op["done"], "total": op["total"]} if op and "done" in op else None
    return {"activity": op, "progress": progress}


def status(host, vm: str | None = None) -> list[dict]:
    now = time.time()
    if vm:
        rel = host.store.relationship(vm)
        if rel is None:
            from ..primary.common import relationship_of
            relationship_of(host, vm, role="")
            raise NotFound(vm)
        return [view(host, rel, now)]
    return [view(host, rel, now) for rel in host.store.relationships()]


HISTORY_HOURS = 48


def measure_vm(host, vm: str, hours: int = HISTORY_HOURS) -> dict:
    """`measure VM`: sizes, lag, durations, missed cycles, errors, bytes, throughput
    over the last 12 h, and (on the primary) what is pending: the bytes the tracking
    bitmap holds now; ``history``: the cycles of the last ``hours`` hours (from the
    start of the hour), per hour and in all, from the cycles kept in full and the
    per-hour aggregates older ones were rolled up into (service.store.roll_up)."""
    rel = host.store.relationship(vm)
    if rel is None:
        from ..primary.common import relationship_of
        relationship_of(host, vm, role="")
    now = time.time()
    out = {"vm": vm, "role": rel.role, "peer": rel.peer, "state": rel.state,
           "frequency": format_frequency(rel.frequency),
           "mode": rel.mode, "sync_state": rel.sync_state,
           "sync_reason": rel.sync_reason, "mode_label": mode_label(rel),
           **host.store.cycle_stats(rel, now)}
    health = assess(rel, now, out, thresholds(host))
    since = hour_of(now - hours * 3600)
    out["history"] = {"hours": hours,
                      **total(vm, host.store.cycle_hours(vm, since), since)}
    out.update(health=health.level, reasons=health.reasons, pending_bytes=None,
               tracking=disk_tracking(host, rel), **_running(host, vm))
    continuous_figures(host, rel, out, now)
    if out["pending_bytes"] is None and rel.role == "primary" and rel.bitmap and \
            rel.state == "replicating" and out["activity"] is None:  # (a cycle holds them)
        out["pending_bytes"] = _pending(host, rel)
    return out


def _pending(host, rel: Relationship) -> int | None:
    lock = host.vm_lock(rel.vm)
    if not lock.acquire(timeout=5):
        return None          # a cycle runs right now
    if dtracking.scanned(rel.disk_tracking, rel.disks):
        return None          # a scanned disk's changes are known only by reading it
    try:
        with host.driver.block_session(rel.vm) as session:
            return sum(b.count for d in rel.disks for b in session.bitmaps(d)
                       if b.name == rel.bitmap)
    except Exception:  # noqa: BLE001 — a measurement must not fail over the pending size
        return None
    finally:
        lock.release()


def record_health_changes(host) -> list[tuple[str, str, str]]:
    """Compare each relationship's health with the last one seen; every change is an
    event. Returns the changes (vm, old, new)."""
    changes = []
    now = time.time()
    for rel in host.store.relationships():
        v = view(host, rel, now)
        old = rel.health_seen
        if old != v["health"]:
            host.store.update_relationship(rel.vm, health_seen=v["health"])
            if old is not None:
                why = "; ".join(v["reasons"]) or "all is well"
                host.event("health", f"health {old} → {v['health']}: {why}", rel.vm)
                changes.append((rel.vm, old, v["health"]))
    return changes
