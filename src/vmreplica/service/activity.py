"""What the daemon is doing right now, for the operator: the operation running on each VM
(a cycle, an initial copy, a resync: its phase, and bytes done of total) and host-wide
waits (the KVM probe). Kept in memory only: a daemon that stops runs nothing.

The primary layer reaches it as ``host.activity`` (it never imports the service);
`status`, `measure`, the dashboard and the CLI's progress lines read it through
``GET /v1/activity``.
"""

from __future__ import annotations

import contextlib
import threading
import time


class Operation:
    """One running operation. Its progress is read when asked: ``source`` is an object
    with a byte counter (a tracking point's ``read_bytes`` or ``compared``)."""

    def __init__(self, vm: str, kind: str, label: str):
        self.vm, self.kind, self.label = vm, kind, label
        self.since = time.time()
        self.phase: str | None = None
        self.total: int | None = None
        self._source = None
        self._attr = ""
        self._t0 = 0.0
        self._done0 = 0
        self._then: str | None = None
        self._t_end: float | None = None

    def measure(self, source, attr: str, total: int, then: str | None = None) -> None:
        """From now on, progress is ``getattr(source, attr)`` bytes of ``total``; once
        all are done the phase is ``then`` (what remains: the replica applying it)."""
        self._source, self._attr, self.total = source, attr, int(total)
        self._t0 = time.monotonic()
        self._done0 = int(getattr(source, attr, 0) or 0)
        self._then, self._t_end = then, None

    def done(self) -> int | None:
        if self._source is None:
            return None
        return int(getattr(self._source, self._attr, 0) or 0)

    def as_dict(self) -> dict:
        out = {"vm": self.vm, "kind": self.kind, "label": self.label, "phase": self.phase,
               "since": self.since, "seconds": round(time.time() - self.since, 1)}
        done = self.done()
        if done is not None and self.total is not None:
            total = max(self.total, done)
            if done >= total:           # the rest is not counted in bytes: its rate stays
                if self._t_end is None:
                    self._t_end = time.monotonic()
                if self._then:
                    out["phase"] = self._then
            elapsed = (self._t_end or time.monotonic()) - self._t0
            rate = (done - self._done0) / elapsed if elapsed > 0.5 else None
            out.update(done=done, total=total,
                       percent=round(100.0 * done / total, 1) if total else 100.0,
                       rate_bps=round(rate) if rate else None,
                       eta_seconds=round((total - done) / rate, 1) if rate else None)
        return out


class Activity:
    def __init__(self):
        self._guard = threading.Lock()
        self._ops: list[Operation] = []

    @contextlib.contextmanager
    def running(self, vm: str, kind: str, label: str):
        op = Operation(vm, kind, label)
        with self._guard:
            self._ops.append(op)
        try:
            yield op
        finally:
            with self._guard:
                self._ops.remove(op)

    def of(self, vm: str) -> dict | None:
        """The operation running on relationship ``vm`` (NAME or NAME@dr), if any."""
        with self._guard:
            ops = [op for op in self._ops if op.vm == vm]
        return ops[-1].as_dict() if ops else None

    def listing(self, vm: str | None = None) -> list[dict]:
        """Running operations (on VM ``vm`` only: its relationships NAME and NAME@dr)
        and the host-wide ones (the KVM probe), oldest first."""
        from ..domain.links import vm_name
        with self._guard:
            ops = [op for op in self._ops
                   if vm is None or op.vm == vm or vm_name(op.vm) == vm_name(vm)]
        out = [op.as_dict() for op in ops]
        from ..hypervisor import kvmprobe
        probe = kvmprobe.state()
        if probe:
            out.append({"vm": None, "phase": None, **probe})
        return out

