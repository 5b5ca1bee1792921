"""Continuous mode, primary side: what the watchdog knows of one VM's mirror
(``MirrorWatch``, in memory) and its probe of the replica.

The probe is our own NBD connection along the mirror's path to the replica's export (the
libvirt driver's relay, or the export itself over TLS). A read on it must answer within
a fraction of `--max-stall`; ``unanswered_for`` says how long one has waited, and
whether the connection broke. Neither the connection nor the read is waited for: a
replica that hangs may accept a connection and never finish the handshake, or never
answer a read, and the watchdog (primary.continuous) must act within the bound.
"""

from __future__ import annotations

import threading
import time
from typing import Any

PROBE_EVERY = 0.5
_PROBE_LOCK = threading.Lock()   # a probe connection handed from its thread to the watchdog


class MirrorWatch:
    """What the watchdog knows of one VM's mirror (in memory; the sub-state is in the store)."""

    def __init__(self, vm: str):
        self.vm = vm
        self.mon = None               # the VM's out-of-band monitor
        self.probe: Any = None        # libnbd handle on the replica's export
        self.probe_cookie = None
        self.probe_pending: dict | None = None   # a connection being made (see probe_connect)
        self.probe_sent = 0.0
        self.last_probe = 0.0
        self.worker: threading.Thread | None = None
        self.last_rotation = 0.0
        self.healthy_since = 0.0
        self.resume_tries = 0
        self.yanked = False
        self.next_attempt = 0.0
        self.offsets: dict[str, int] = {}
        self.job_bytes: int | None = None     # the mirror jobs' progress, last seen
        self.last_write_at: float | None = None   # when that progress last moved

    def busy(self) -> bool:
        return self.worker is not None and self.worker.is_alive()

    def close(self) -> None:
        from ..qemutools import nbdio
        if self.probe is not None:
            nbdio.close(self.probe)
            self.probe = None
        self.probe_cookie = None
        self.probe_pending = None
        if self.mon is not None:
            self.mon.close()
            self.mon = None


def unanswered_for(m: MirrorWatch, stall: float) -> float:
    """Seconds the replica has left a probe unanswered once that is past the bound
    (a fraction of --max-stall, so the yank comes in time), 0 if all is well, -1 if
    the connection to its export broke (the replica went away)."""
    now = time.monotonic()
    if m.probe is None:
        pending = m.probe_pending
        if pending is None:
            return 0.0
        # The connection itself is the first probe: a replica (or relay) that hangs
        # may accept it and never finish the handshake.
        with _PROBE_LOCK:
            h = pending.get("h")
            if h is not None:
                m.probe, m.probe_cookie, m.probe_pending = h, None, None
                m.last_probe = 0.0
        if h is None:
            if "e" in pending:
                m.probe_pending = None
                return -1.0
            waited = now - pending["since"]
            return waited if waited > stall * 0.6 else 0.0
    try:
        assert m.probe is not None          # (connected above, or returned)
        m.probe.poll(0)
        if m.probe_cookie is not None and m.probe.aio_command_completed(m.probe_cookie):
            m.probe_cookie = None
            if not m.healthy_since:
                m.healthy_since = now
    except Exception:  # noqa: BLE001 — the export went away
        from ..qemutools import nbdio
        nbdio.close(m.probe)
        m.probe, m.probe_cookie = None, None
        return -1.0
    if m.probe_cookie is not None:
        waited = now - m.probe_sent
        return waited if waited > stall * 0.6 else 0.0
    if now - m.last_probe >= PROBE_EVERY:
        m.probe_cookie = m.probe.aio_pread(bytearray(512), 0)
        m.probe_sent = m.last_probe = now
    return 0.0


def probe_connect(m: MirrorWatch, host, vm: str, creds: str, target: dict,
                  export: str) -> None:
    """Open our own NBD connection along the mirror's path on a short-lived thread (a
    replica that hangs may accept a connection and never finish the handshake; the
    watchdog must not wait for it: ``unanswered_for`` times the attempt like a probe
    read): through the driver's relay when it has one (libvirt: so a relay that hangs is
    caught too), else straight to the replica's export over TLS."""
    relay = host.driver.mirror_relay_socket(vm)
    pending: dict = {"since": time.monotonic()}

    def connect():
        import nbd

        from ..qemutools import nbdio
        try:
            h = nbd.NBD()
            h.set_export_name(export)
            if relay:
                h.connect_unix(relay)
            else:
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_certificates(str(creds))
                h.set_tls_verify_peer(True)
                h.connect_tcp(target["host"], str(target["port"]))
        except Exception as e:  # noqa: BLE001 — reported by unanswered_for
            pending["e"] = e
            return
        with _PROBE_LOCK:
            if m.probe_pending is pending:
                pending["h"] = h
                return
        nbdio.close(h)                          # given up on meanwhile

    m.probe, m.probe_cookie, m.probe_pending = None, None, pending
    threading.Thread(target=connect, name=f"probe-{vm}", daemon=True).start()
