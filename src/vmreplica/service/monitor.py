"""What operators watch: status, health with reasons (judged on the last 12 h of cycles
and configurable thresholds), Measure-VMReplication-style statistics, and the health
changes that become events. Read models for the CLI, the dashboard and /metrics."""

from __future__ import annotations

import time

from ..domain.health import DEFAULT_THRESHOLDS, assess, measure
from ..domain.schedule import format_frequency
from ..domain.states import next_step
from ..errors import NotFound


def thresholds(host) -> dict:
    return dict(DEFAULT_THRESHOLDS, **(host.store.get_setting("health_thresholds") or {}))


def view(host, rel: dict, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    stats = measure(rel, host.store.cycles(rel["vm"], limit=5000), now)
    health = assess(rel, now, stats, thresholds(host))
    return {
        "vm": rel["vm"], "role": rel["role"], "peer": rel["peer"], "state": rel["state"],
        "health": health.level, "reasons": health.reasons,
        "frequency": format_frequency(int(rel.get("frequency", 300))),
        "mode": rel.get("mode") or "periodic", "sync_state": rel.get("sync_state"),
        "sync_reason": rel.get("sync_reason"),
        "last_cycle_at": stats["last_cycle_at"], "lag_seconds": stats["lag_seconds"],
        "cycle": rel.get("cycle") if rel["role"] == "primary" else rel.get("last_applied_cycle"),
        "epoch": rel["epoch"], "last_error": rel.get("last_error"),
        "disks": rel["disks"], "fenced": rel.get("fenced"), "next": next_step(rel),
        "test_vm": (rel.get("test") or {}).get("vm"),
        "progress": rel.get("progress"), "resync_window": rel.get("resync_window"),
        "tags": rel.get("tags") or [],
    }


def status(host, vm: str | None = None) -> list[dict]:
    now = time.time()
    if vm:
        rel = host.store.relationship(vm)
        if rel is None:
            from ..primary.relationship import _rel
            _rel(host, vm, role="")
            raise NotFound(vm)
        return [view(host, rel, now)]
    return [view(host, rel, now) for rel in host.store.relationships()]


def measure_vm(host, vm: str) -> dict:
    """`measure VM`: sizes, lag, durations, missed cycles, errors, bytes, throughput,
    and (on the primary) what is pending: the bytes the tracking bitmap holds now."""
    rel = host.store.relationship(vm)
    if rel is None:
        from ..primary.relationship import _rel
        _rel(host, vm, role="")
    now = time.time()
    out = {"vm": vm, "role": rel["role"], "peer": rel["peer"], "state": rel["state"],
           "frequency": format_frequency(int(rel.get("frequency", 300))),
           **measure(rel, host.store.cycles(vm, limit=5000), now)}
    health = assess(rel, now, out, thresholds(host))
    out.update(health=health.level, reasons=health.reasons, pending_bytes=None)
    if rel["role"] == "primary" and rel.get("bitmap") and rel["state"] == "replicating":
        out["pending_bytes"] = _pending(host, rel)
    return out


def _pending(host, rel: dict) -> int | None:
    lock = host.vm_lock(rel["vm"])
    if not lock.acquire(timeout=5):
        return None          # a cycle runs right now
    try:
        with host.driver.block_session(rel["vm"]) as session:
            return sum(b.count for d in rel["disks"] for b in session.bitmaps(d)
                       if b.name == rel["bitmap"])
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
        old = rel.get("health_seen")
        if old != v["health"]:
            host.store.update_relationship(rel["vm"], health_seen=v["health"])
            if old is not None:
                why = "; ".join(v["reasons"]) or "all is well"
                host.event("health", f"health {old} → {v['health']}: {why}", rel["vm"])
                changes.append((rel["vm"], old, v["health"]))
    return changes
