"""Prometheus metrics: one series per relationship (lag, state, health, bytes, cycle
duration, missed cycles, recovery points), rendered fresh at every scrape from the state
store. Served at /metrics by the web listener (see web/)."""

from __future__ import annotations

import time

from ..domain.health import LEVELS
from ..domain.states import State
from .monitor import view

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(host) -> bytes:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest
    reg = CollectorRegistry()
    labels = ["vm", "role", "peer"]
    lag = Gauge("vmreplica_lag_seconds", "Age of the newest state on the replica", labels,
                registry=reg)
    state = Gauge("vmreplica_state", "Relationship state (1 for the current one)",
                  labels + ["state"], registry=reg)
    health = Gauge("vmreplica_health", "Health: 0 normal, 1 warning, 2 critical", labels,
                   registry=reg)
    raw = Gauge("vmreplica_bytes_replicated_12h", "Guest bytes shipped in the last 12 h",
                labels, registry=reg)
    sent = Gauge("vmreplica_bytes_sent_12h", "Bytes on the wire (compressed) in the last 12 h",
                 labels, registry=reg)
    dur = Gauge("vmreplica_last_cycle_duration_seconds", "Duration of the last good cycle",
                labels, registry=reg)
    missed = Gauge("vmreplica_missed_cycles_12h", "Cycles missed in the last 12 h", labels,
                   registry=reg)
    errors = Gauge("vmreplica_failed_cycles_12h", "Cycles that failed in the last 12 h",
                   labels, registry=reg)
    epoch = Gauge("vmreplica_epoch", "Relationship epoch (bumped by failover)", labels,
                  registry=reg)
    points = Gauge("vmreplica_recovery_points", "Recovery points held on this host", labels,
                   registry=reg)
    up = Gauge("vmreplica_up", "The daemon answers", registry=reg)
    up.set(1)
    now = time.time()
    for rel in host.store.relationships():
        key = (rel.vm, rel.role, rel.peer)
        v = view(host, rel, now)
        stats = host.store.cycle_stats(rel, now)
        if v["lag_seconds"] is not None:
            lag.labels(*key).set(v["lag_seconds"])
        for s in State:
            state.labels(*key, s.value).set(1 if s.value == rel.state else 0)
        health.labels(*key).set(LEVELS.index(v["health"]))
        raw.labels(*key).set(stats["bytes_raw"])
        sent.labels(*key).set(stats["bytes_sent"])
        if stats["last_cycle_seconds"] is not None:
            dur.labels(*key).set(stats["last_cycle_seconds"])
        missed.labels(*key).set(stats["missed_cycles"])
        errors.labels(*key).set(stats["errors"])
        epoch.labels(*key).set(rel.epoch)
        points.labels(*key).set(len(host.store.points(rel.vm)))
    return generate_latest(reg)
