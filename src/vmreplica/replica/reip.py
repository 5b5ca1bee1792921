"""Re-IP after a failover: the failed-over (or test) VM's NICs get their failover
addresses (domain.reip) inside the guest, through the guest agent, once it answers.

The failover does not wait for the guest to boot: ``launch`` records the re-IP as
waiting on the relationship (``Relationship.reip``) and a daemon thread does the rest —
it polls ``guest-ping`` (every second, up to ``AGENT_WAIT`` after the VM started), finds
each NIC inside the guest by its MAC (``guest-network-get-interfaces``), runs iproute2
through ``guest-exec`` (global addresses of the family replaced, link up, default route),
writes /etc/resolv.conf (``guest-file-*``) when DNS servers are given, and checks the
result with ``guest-network-get-interfaces`` again. The outcome is a `re-ip` event and
the record's state (done, or failed: a warning in the relationship's health, on the VM
that failed over — never a failed failover). A record that was replaced meanwhile (the
test stopped, the failover cancelled, another one started) ends the thread quietly. A
daemon that restarts while one waits takes it up again (``resume_all``).

The addresses are set in the running guest, not in its network configuration files: a
reboot of the failed-over VM loses them (its own configuration applies again).
"""

from __future__ import annotations

import base64
import logging
import threading
import time

from ..domain.reip import (
    FailoverIP,
    commands,
    has_address,
    interface_of,
    resolv_conf,
)
from ..errors import Conflict, HypervisorError, NotFound, VmreplicaError

log = logging.getLogger("vmreplica.reip")

AGENT_WAIT = 300.0        # seconds after the VM's start the guest agent may take to answer
POLL = 1.0
EXEC_WAIT = 30.0          # one command inside the guest
ATTEMPTS = 3              # a guest still bringing its devices up: the whole set-up again
RESOLV_CONF = "/etc/resolv.conf"


class ReIPFailed(Exception):
    pass


def launch(host, vm: str, target: str, ips: list[dict], purpose: str) -> dict:
    """Record a waiting re-IP of ``target`` (the VM of relationship ``vm`` that was just
    started: itself, or its test VM; ``purpose`` failover | test) and start its thread.
    The record, as stored."""
    record = {"vm": target, "for": purpose, "state": "waiting", "started_at": time.time(),
              "ips": ips, "message": f"waiting for the guest agent of {target}"}
    host.store.update_relationship(vm, reip=record)
    _thread(host, vm, record)
    return record


def resume_all(host) -> list[str]:
    """At daemon start: take up the re-IPs a stopped daemon left waiting; their VMs."""
    out = []
    for rel in host.store.relationships():
        if rel.reip and rel.reip.get("state") == "waiting":
            _thread(host, rel.vm, rel.reip)
            out.append(rel.vm)
    return out


def _thread(host, vm: str, record: dict) -> None:
    threading.Thread(target=_run, args=(host, vm, record), name=f"reip-{vm}",
                     daemon=True).start()


def _current(host, vm: str, record: dict) -> bool:
    rel = host.store.relationship(vm)
    return rel is not None and rel.reip is not None and \
        rel.reip.get("started_at") == record["started_at"]


def _finish(host, vm: str, record: dict, state: str, message: str, **more) -> bool:
    """Store the outcome if the record is still the relationship's (one transaction)."""
    with host.store.transaction():
        if not _current(host, vm, record):
            return False
        done = dict(record, state=state, message=message, finished_at=time.time(),
                    seconds=round(time.time() - record["started_at"], 1), **more)
        host.store.update_relationship(vm, reip=done)
    return True


def _run(host, vm: str, record: dict) -> None:
    target = record["vm"]
    try:
        ips = [FailoverIP.from_dict(d) for d in record["ips"]]
        waited = _wait_for_agent(host, vm, record)
        if waited is None:
            return                      # replaced meanwhile: nobody waits for this one
        last: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                done = _apply(host, target, ips)
                break
            except ReIPFailed as e:
                last = e
                if attempt + 1 < ATTEMPTS:
                    time.sleep(2)
        else:
            raise ReIPFailed(str(last))
    except (ReIPFailed, VmreplicaError) as e:
        text = e.message if isinstance(e, VmreplicaError) else str(e)
        if _finish(host, vm, record, "failed", text):
            host.event("re-ip", f"re-IP of {target} failed: {text}; the VM runs, its "
                                "addresses are not the failover ones (warning)", vm)
        return
    except Exception as e:  # noqa: BLE001 — a thread's last word goes to the record
        log.exception("re-IP of %s", target)
        if _finish(host, vm, record, "failed", f"internal error: {e}"):
            host.event("re-ip", f"re-IP of {target} failed: internal error: {e}", vm)
        return
    seconds = time.time() - record["started_at"]
    text = "; ".join(done)
    if _finish(host, vm, record, "done", text):
        host.event("re-ip", f"re-IP of {target} done {seconds:.1f} s after its start "
                            f"(guest agent after {waited:.1f} s), checked through the guest "
                            f"agent: {text}", vm)


def _wait_for_agent(host, vm: str, record: dict) -> float | None:
    """Seconds from the VM's start to the agent's first answer; None when the record was
    replaced meanwhile; ReIPFailed when the bound passed or the VM cannot answer."""
    target = record["vm"]
    last = ""
    while True:
        if not _current(host, vm, record):
            return None
        try:
            host.driver.agent_command(target, "guest-ping", timeout=5)
            return time.time() - record["started_at"]
        except NotFound:
            raise ReIPFailed(f"{target} is gone") from None
        except Conflict as e:
            raise ReIPFailed(f"{target} is not running ({e.message})") from None
        except HypervisorError as e:
            if "no guest agent channel" in e.message:
                raise ReIPFailed(f"{target} has no guest agent (qemu-guest-agent and its "
                                 "virtio channel org.qemu.guest_agent.0)") from None
            last = e.message
        if time.time() - record["started_at"] > AGENT_WAIT:
            raise ReIPFailed(f"the guest agent of {target} did not answer within "
                             f"{AGENT_WAIT:.0f} s of its start ({last})")
        time.sleep(POLL)


def _apply(host, target: str, ips: list[FailoverIP]) -> list[str]:
    """Set every address, the DNS servers, and check; what was done, one text per NIC."""
    interfaces = _interfaces(host, target)
    names = {}
    for ip in ips:
        mac = ip.nic
        found = interface_of(mac, interfaces)
        if found is None:
            seen = ", ".join(f"{i.get('name')} {i.get('hardware-address', '-')}"
                             for i in interfaces) or "none"
            raise ReIPFailed(f"no interface with MAC {mac} in the guest (its interfaces: "
                             f"{seen})")
        names[mac] = str(found["name"])
        for argv in commands(ip, names[mac]):
            _exec(host, target, argv)
    conf = resolv_conf(ips)
    if conf is not None:
        _write_file(host, target, RESOLV_CONF, conf)
    # The check: what the guest reports now.
    interfaces = _interfaces(host, target)
    done = []
    for ip in ips:
        found = interface_of(ip.nic, interfaces)
        if found is None or not has_address(ip, found):
            have = ", ".join(f"{a.get('ip-address')}/{a.get('prefix')}"
                             for a in (found or {}).get("ip-addresses") or []) or "none"
            raise ReIPFailed(f"{names[ip.nic]} ({ip.nic}) does not carry "
                             f"{ip.address.with_prefixlen} after the set-up (it has {have})")
        done.append(f"{names[ip.nic]} ({ip.nic}) {ip.address.with_prefixlen}"
                    + (f" gw {ip.gateway}" if ip.gateway else "")
                    + (" dns " + "+".join(str(d) for d in ip.dns) if ip.dns else ""))
    if conf is not None:
        text = _read_file(host, target, RESOLV_CONF)
        if text != conf:
            raise ReIPFailed(f"{RESOLV_CONF} in the guest does not hold what was written "
                             f"(it holds {text[:200]!r})")
    return done


def _interfaces(host, target: str) -> list[dict]:
    try:
        out = host.driver.agent_command(target, "guest-network-get-interfaces", timeout=10)
    except HypervisorError as e:
        raise ReIPFailed(e.message) from None
    return out if isinstance(out, list) else []


def _exec(host, target: str, argv: list[str]) -> None:
    """Run ``argv`` in the guest (guest-exec, PATH searched); ReIPFailed unless it exits 0."""
    cmd = " ".join(argv)
    try:
        pid = host.driver.agent_command(target, "guest-exec", {
            "path": argv[0], "arg": argv[1:], "capture-output": True}, timeout=10)["pid"]
        t0 = time.monotonic()
        while True:
            st = host.driver.agent_command(target, "guest-exec-status", {"pid": pid},
                                           timeout=10)
            if st.get("exited"):
                break
            if time.monotonic() - t0 > EXEC_WAIT:
                raise ReIPFailed(f"`{cmd}` did not end within {EXEC_WAIT:.0f} s in the guest")
            time.sleep(0.1)
    except HypervisorError as e:
        raise ReIPFailed(f"`{cmd}`: {e.message}") from None
    if st.get("exitcode", -1) != 0:
        err = base64.b64decode(st.get("err-data", "") or "").decode(errors="replace").strip()
        raise ReIPFailed(f"`{cmd}` exited {st.get('exitcode', st.get('signal'))} in the "
                         f"guest: {err[:300] or 'no message'}")


def _write_file(host, target: str, path: str, text: str) -> None:
    try:
        handle = host.driver.agent_command(target, "guest-file-open",
                                           {"path": path, "mode": "w"}, timeout=10)
        try:
            host.driver.agent_command(target, "guest-file-write", {
                "handle": handle, "buf-b64": base64.b64encode(text.encode()).decode()},
                timeout=10)
        finally:
            host.driver.agent_command(target, "guest-file-close", {"handle": handle},
                                      timeout=10)
    except HypervisorError as e:
        raise ReIPFailed(f"writing {path} in the guest: {e.message}") from None


def _read_file(host, target: str, path: str) -> str:
    try:
        handle = host.driver.agent_command(target, "guest-file-open",
                                           {"path": path, "mode": "r"}, timeout=10)
        try:
            got = host.driver.agent_command(target, "guest-file-read",
                                            {"handle": handle, "count": 65536}, timeout=10)
        finally:
            host.driver.agent_command(target, "guest-file-close", {"handle": handle},
                                      timeout=10)
    except HypervisorError as e:
        raise ReIPFailed(f"reading {path} in the guest: {e.message}") from None
    return base64.b64decode(got.get("buf-b64", "") or "").decode(errors="replace")
