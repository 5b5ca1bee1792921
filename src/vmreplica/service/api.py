"""Routes of the two APIs a daemon serves.

Management API (unix socket in the home, for the CLI and later the dashboard): every
operation of the host. Replication API (TCP + mutual TLS, for peer hosts): pairing,
hello, relationship creation, cycles, removal; every route but /v1/pair requires a
pinned client certificate.
"""

from __future__ import annotations

import os
import threading
import time

from .. import __version__
from ..domain.patterns import validate_pattern
from ..domain.relationship import DEFAULTS, FREQUENCY_TEXT, POINT_INTERVAL_TEXT
from ..errors import Refused, UsageError
from ..primary import planned, resync
from ..primary import relationship as prim
from ..primary.common import relationship_of
from ..replica import failover as rfailover
from ..replica import points as rpoints
from ..replica import receiver, removal
from ..replica import reverse as rreverse
from ..transport.http import Request, Router
from . import monitor, operations, trust, vms


def _flag(req: Request, name: str) -> bool:
    return req.query.get(name, "") in ("1", "true", "yes")


def _epoch(req: Request) -> int:
    """The ``epoch`` query parameter of a peer's request (0 if absent)."""
    text = req.query.get("epoch", "0")
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise UsageError(f"epoch must be a whole number, not {text[:40]!r}")
    return int(text)


def management_routes(host, daemon) -> Router:
    r = Router()

    @r.route("GET", "/v1/ping")
    def ping(req):
        return {"name": host.name, "pid": os.getpid(), "version": __version__,
                "listen": host.listen, "started_at": daemon.started_at}

    @r.route("POST", "/v1/shutdown")
    def shutdown(req):
        threading.Thread(target=daemon.stop, name="shutdown", daemon=True).start()
        return {"stopping": True, "pid": os.getpid()}

    @r.route("POST", "/v1/dashboard/token")
    def dashboard_token(req):
        web = host.store.get_setting("web_listen")
        if not web or daemon.web is None:
            raise UsageError(f"{host.name} has no dashboard (its web listener is off)",
                             hint="init the host with --web HOST:PORT")
        return {"url": f"https://{web}/login?token={daemon.web.new_token()}",
                "address": web, "valid_seconds": 600}

    @r.route("GET", "/v1/host")
    def host_info(req):
        return {"name": host.name, "listen": host.listen, "fingerprint": host.fingerprint,
                "driver": host.store.get_setting("driver"), "home": str(host.home.root),
                "web": host.store.get_setting("web_listen"),
                "version": __version__, "accel": _accel_info(host)}

    @r.route("POST", "/v1/host/probe-kvm")
    def probe_kvm(req):
        """Probe again whether KVM boots a guest on this machine (`host probe-kvm`)."""
        from ..hypervisor import kvmprobe
        if host.store.get_setting("driver", "qemu") != "qemu":
            raise UsageError("the KVM probe is the qemu driver's (`--accel auto`); libvirt "
                             "chooses its domain type itself")
        found = kvmprobe.answer(host.home.run, reprobe=True)
        # (an answer that needed no boot, e.g. no /dev/kvm, has no key and is not stored)
        return {**_accel_info(host), "answer": found["accel"], "reason": found["reason"],
                "booted": found.get("key") is not None,
                "remembered_in": found.get("path"),
                "probe_seconds": found.get("probe_seconds")}

    @r.route("GET", "/v1/activity")
    def activity(req):
        """What runs now: each VM's operation (phase, bytes done of total, rate, ETA)
        and host-wide waits such as the KVM probe; ``?vm=NAME`` for one VM."""
        return {"host": host.name,
                "operations": host.activity.listing(req.query.get("vm") or None)}

    # -- trust -------------------------------------------------------------------
    @r.route("POST", "/v1/trust/token")
    def token(req):
        return trust.make_token(host)

    @r.route("POST", "/v1/trust/pair")
    def pair(req):
        body = req.json()
        return trust.pair(host, str(body.get("address", "")), str(body.get("token", "")))

    @r.route("GET", "/v1/trust/peers")
    def peers(req):
        return {"peers": [{k: p[k] for k in ("name", "address", "fingerprint", "paired_at")}
                          for p in host.store.peers()]}

    @r.route("DELETE", "/v1/trust/peers/{name}")
    def unpair(req):
        name = req.params["name"]
        users = [x.vm for x in host.store.relationships() if x.peer == name]
        if users:
            raise UsageError(f"{name} is still used by the replication of {', '.join(users)}",
                             hint="remove those relationships first")
        if not host.store.remove_peer(name):
            raise UsageError(f"no paired host named {name}")
        host.event("trust", f"unpaired {name}")
        return {"removed": name}

    @r.route("POST", "/v1/test-connection")
    def test_connection(req):
        body = req.json()
        address = str(body.get("address", ""))
        t0 = time.monotonic()
        client = host.client_for_address(address, timeout=10)
        hello = client.request("GET", "/v1/hello")
        return {"address": address, "peer": hello.get("name"), "replica_server":
                hello.get("replica_server"), "authorized": hello.get("authorized"),
                "round_trip_ms": round((time.monotonic() - t0) * 1000, 1)}

    # -- replica server ------------------------------------------------------------
    @r.route("GET", "/v1/replica-server")
    def rs_show(req):
        settings = host.store.get_setting("replica_server") or {}
        return {"name": host.name, "enabled": bool(settings.get("enabled")),
                "listen": host.listen, "storage": settings.get("storage"),
                "fingerprint": host.fingerprint,
                "authorizations": host.store.authorizations()}

    @r.route("POST", "/v1/replica-server")
    def rs_set(req):
        body = req.json()
        settings = host.store.get_setting("replica_server") or {}
        enable = body.get("enabled", True)
        storage = body.get("storage") or settings.get("storage") or str(host.home.storage)
        storage = os.path.abspath(storage)
        patterns = [validate_pattern(p) for p in body.get("allow") or []]
        tag = str(body.get("tag") or "")
        if enable:
            os.makedirs(storage, exist_ok=True)
            if not os.access(storage, os.W_OK):
                raise UsageError(f"storage directory {storage} is not writable")
        for p in patterns:
            host.store.add_authorization(p, storage, tag)
        for p in body.get("disallow") or []:
            host.store.remove_authorization(p.lower())
        settings.update(enabled=bool(enable), storage=storage)
        host.store.set_setting("replica_server", settings)
        host.event("replica-server", ("enabled" if enable else "disabled")
                   + (f"; allowed {', '.join(patterns)}" if patterns else ""))
        return rs_show(req)

    # -- VMs -----------------------------------------------------------------------
    @r.route("GET", "/v1/vms")
    def vm_list(req):
        return {"vms": vms.list_all(host)}

    @r.route("POST", "/v1/vms")
    def vm_create(req):
        return vms.create(host, req.json())

    @r.route("GET", "/v1/vms/{name}")
    def vm_show(req):
        return vms.show(host, req.params["name"])

    @r.route("POST", "/v1/vms/{name}/start")
    def vm_start(req):
        return vms.start(host, req.params["name"])

    @r.route("POST", "/v1/vms/{name}/stop")
    def vm_stop(req):
        return vms.stop(host, req.params["name"], _flag(req, "force"),
                        float(req.query.get("timeout") or 60))

    @r.route("GET", "/v1/vms/{name}/check")
    def vm_check(req):
        return {"name": req.params["name"], **host.driver.check(req.params["name"])}

    @r.route("POST", "/v1/vms/{name}/save")
    def vm_save(req):
        with host.vm_lock(req.params["name"]):
            path = host.driver.save(req.params["name"])
        host.event("vm", f"VM state saved to {path}; the next start resumes it",
                   req.params["name"])
        return {"name": req.params["name"], "saved": str(path)}

    @r.route("POST", "/v1/vms/{name}/io")
    def vm_io(req):
        b = req.json()
        return {"output": host.driver.io(req.params["name"], str(b.get("disk", "")),
                                         str(b.get("command", "")))}

    @r.route("POST", "/v1/vms/{name}/tags")
    def vm_tags(req):
        b = req.json()
        return vms.tag(host, req.params["name"], list(b.get("add") or []),
                       list(b.get("remove") or []))

    @r.route("DELETE", "/v1/vms/{name}")
    def vm_delete(req):
        return vms.delete(host, req.params["name"])

    # -- relationships ---------------------------------------------------------------
    @r.route("POST", "/v1/relationships")
    def enable(req):
        b = req.json()
        return prim.enable(host, str(b.get("vm", "")), str(b.get("replica", "")),
                           frequency=b.get("frequency") or FREQUENCY_TEXT,
                           compression=b.get("compression") or DEFAULTS.compression,
                           exclude_disks=b.get("exclude_disks") or [],
                           security_tag=b.get("security_tag") or DEFAULTS.security_tag,
                           history=int(b.get("history", DEFAULTS.history)),
                           point_interval=b.get("point_interval") or POINT_INTERVAL_TEXT,
                           app_every=int(b.get("app_every") or DEFAULTS.app_every),
                           resync_window=b.get("resync_window"),
                           mode=b.get("mode") or DEFAULTS.mode,
                           max_stall=float(b.get("max_stall") or DEFAULTS.max_stall),
                           dr=bool(b.get("dr")))

    @r.route("POST", "/v1/relationships/{vm}/dr-adopt")
    def dr_adopt(req):
        from ..primary import dr
        b = req.json()
        return dr.adopt(host, req.params["vm"], replica=b.get("replica"),
                        resync=not b.get("no_resync"))

    @r.route("POST", "/v1/relationships/{vm}/initial")
    def initial(req):
        b = req.json()
        if b.get("import"):
            from ..replica import seeding as rseeding
            return rseeding.import_seed(host, req.params["vm"], b["import"])
        from ..primary import seeding
        return seeding.initial(host, req.params["vm"], method=b.get("method") or "network",
                               path=b.get("path"), at=b.get("at"),
                               verify=bool(b.get("verify")) or _flag(req, "verify"))

    @r.route("POST", "/v1/relationships/{vm}/sync")
    def sync(req):
        return operations.sync(host, req.params["vm"], verify=_flag(req, "verify"))

    @r.route("POST", "/v1/relationships/{vm}/suspend")
    def suspend(req):
        return operations.suspend(host, req.params["vm"])

    @r.route("POST", "/v1/relationships/{vm}/resume")
    def resume(req):
        return operations.resume(host, req.params["vm"])

    @r.route("DELETE", "/v1/relationships/{vm}")
    def remove(req):
        return operations.remove(host, req.params["vm"],
                                 keep_replica=_flag(req, "keep_replica"),
                                 force=_flag(req, "force"))

    @r.route("GET", "/v1/relationships/{vm}/points")
    def points_list(req):
        return {"points": recovery_points(host, req.params["vm"])}

    @r.route("POST", "/v1/relationships/{vm}/failover")
    def failover_action(req):
        return failover(host, req.params["vm"], req.json())

    @r.route("POST", "/v1/relationships/{vm}/settings")
    def set_settings(req):
        from ..primary import settings
        b = req.json()
        exclude, include = b.pop("exclude_disks", None) or [], b.pop("include_disks", None) or []
        out = {"vm": req.params["vm"]}
        if exclude or include:
            out.update(settings.change_disks(host, req.params["vm"], exclude, include))
        if any(v is not None for v in b.values()) or not (exclude or include):
            out.update(settings.apply(host, req.params["vm"], settings.validate(b)))
        return out

    @r.route("POST", "/v1/relationships/{vm}/resync")
    def resync_action(req):
        return resync.request(host, req.params["vm"], now=_flag(req, "now"))

    @r.route("GET", "/v1/cluster/status")
    def cluster_status(req):
        return operations.cluster_status(host)

    @r.route("POST", "/v1/cluster/protect")
    def cluster_protect(req):
        from ..cluster import protect
        return protect.protect(host, req.json())

    @r.route("POST", "/v1/cluster/vms/{vm}/{action}")
    def cluster_action(req):
        from ..cluster import protect
        return protect.action(host, req.params["vm"], req.params["action"], req.json())

    @r.route("POST", "/v1/relationships/{vm}/take-over")
    def take_over(req):
        from ..cluster import ops
        return ops.take_over(host, req.params["vm"])

    @r.route("POST", "/v1/relationships/{vm}/reverse")
    def reverse_action(req):
        return operations.reverse(host, req.params["vm"])

    @r.route("GET", "/v1/status")
    def status(req):
        return {"host": host.name, "relationships": monitor.status(host, req.query.get("vm"))}

    @r.route("GET", "/v1/relationships/{vm}/measure")
    def measure(req):
        return monitor.measure_vm(host, req.params["vm"])

    @r.route("GET", "/v1/health-thresholds")
    def get_thresholds(req):
        return monitor.thresholds(host)

    @r.route("POST", "/v1/health-thresholds")
    def set_thresholds(req):
        b = req.json()
        current = dict(host.store.get_setting("health_thresholds") or {})
        for key, kind in (("missed_warning_pct", float), ("lag_warning_factor", float),
                          ("failures_critical", int)):
            if key in b:
                value = kind(b[key])
                if value <= 0:
                    raise UsageError(f"{key} must be above zero")
                current[key] = value
        host.store.set_setting("health_thresholds", current)
        host.event("health", f"thresholds changed: {current}")
        return monitor.thresholds(host)

    @r.route("GET", "/v1/events")
    def events(req):
        vm = req.query.get("vm")
        found = host.store.events(vm, float(req.query.get("since", 0) or 0))
        if not _flag(req, "follow"):
            return {"events": found}
        return _follow(host, daemon, vm, found)

    return r


def replication_routes(host) -> Router:
    r = Router()

    @r.route("POST", "/v1/pair")
    def pair(req):
        return trust.accept_pairing(host, req.json())

    @r.route("GET", "/v1/hello")
    def hello(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        from ..domain.patterns import find_authorization
        settings = host.store.get_setting("replica_server") or {}
        entry = find_authorization(host.store.authorizations(), peer["name"])
        return {"name": host.name, "version": __version__, "you": peer["name"],
                "replica_server": bool(settings.get("enabled")),
                "authorized": entry is not None}

    @r.route("POST", "/v1/replica/relationships")
    def create(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return receiver.create_relationship(host, peer, req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/cycles")
    def cycle(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        removal.refuse_if_removed(host, peer, req.params["vm"])
        return receiver.receive_cycle(host, peer, req.params["vm"], req.body())

    @r.route("POST", "/v1/replica/relationships/{vm}/adopt")
    def replica_adopt(req):
        from ..replica import seeding as rseeding
        peer = trust.require_peer(host, req.peer_fingerprint)
        return rseeding.adopt(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/disks")
    def replica_disks(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return receiver.change_disks(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/settings")
    def replica_settings(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return receiver.apply_settings(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/mirror")
    def replica_mirror(req):
        from ..replica import checks, mirror
        peer = trust.require_peer(host, req.peer_fingerprint)
        b = req.json()
        if b.get("action") == "close":
            with host.vm_lock(req.params["vm"]):
                checks.own_relationship(host, peer, req.params["vm"])
                return {"closed": mirror.close_target(host, req.params["vm"])}
        return mirror.open_target(host, peer, req.params["vm"])

    @r.route("POST", "/v1/replica/relationships/{vm}/point")
    def replica_point(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return receiver.point_now(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/final")
    def replica_final(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return receiver.final_marker(host, peer, req.params["vm"], req.json())

    @r.route("GET", "/v1/cluster/relationships/{vm}")
    def cluster_view(req):
        from ..cluster.status import local_view
        trust.require_peer(host, req.peer_fingerprint)
        return local_view(host, req.params["vm"])

    @r.route("POST", "/v1/peer/relationships/{vm}/dr")
    def peer_dr(req):
        from ..primary import dr
        peer = trust.require_peer(host, req.peer_fingerprint)
        return dr.remember(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/replica/relationships/{vm}/transfer")
    def replica_transfer(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        with host.vm_lock(req.params["vm"]):
            return receiver.transfer(host, peer, req.params["vm"], req.json())

    @r.route("POST", "/v1/cluster/relationships/{vm}/handover")
    def cluster_handover(req):
        from ..cluster import ops
        peer = trust.require_peer(host, req.peer_fingerprint)
        return ops.handover(host, peer, req.params["vm"], req.json())

    @r.route("GET", "/v1/peer/relationships/{vm}/primary-state")
    def primary_state(req):
        """The replica asks before an unplanned failover (replica.failover._guard)."""
        peer = trust.require_peer(host, req.peer_fingerprint)
        return primary_view(host, peer, req.params["vm"])

    @r.route("GET", "/v1/replica/relationships/{vm}/state")
    def replica_state(req):
        """The primary asks whether it still is one (see primary.standing.check_peer)."""
        peer = trust.require_peer(host, req.peer_fingerprint)
        removal.refuse_if_removed(host, peer, req.params["vm"])
        return receiver.state_for_primary(host, peer, req.params["vm"], _epoch(req))

    @r.route("GET", "/v1/replica/relationships/{vm}/points")
    def replica_points(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        rel = host.store.relationship(req.params["vm"])
        if rel is None or rel.peer != peer["name"]:
            raise Refused(f"{host.name} holds no replica of {req.params['vm']} for {peer['name']}")
        return {"points": rpoints.listing(host, req.params["vm"])}

    @r.route("GET", "/v1/replica/relationships/{vm}/manifest")
    def replica_manifest(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return rreverse.manifest(host, peer, req.params["vm"], _epoch(req))

    @r.route("POST", "/v1/replica/relationships/{vm}/reverse")
    def replica_reverse(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        return rreverse.become_replica(host, peer, req.params["vm"], req.json())

    @r.route("DELETE", "/v1/replica/relationships/{vm}")
    def remove(req):
        peer = trust.require_peer(host, req.peer_fingerprint)
        if _flag(req, "ended"):
            # The primary ended its side after a "removed" refusal: only the tombstone goes.
            return {"vm": req.params["vm"], "already": True,
                    "tombstone": removal.forget(host, req.params["vm"], peer["name"])}
        rel = host.store.relationship(req.params["vm"])
        if rel is not None and rel.peer != peer["name"]:
            raise Refused(f"{req.params['vm']} on {host.name} is replicated from {rel.peer}")
        if rel is None and removal.forget(host, req.params["vm"], peer["name"]):
            return {"vm": req.params["vm"], "already": True}   # removed here before
        return receiver.remove_relationship(host, req.params["vm"], _flag(req, "keep"))

    @r.route("POST", "/v1/peer/relationships/{vm}/removed")
    def peer_removed(req):
        """The replica runs `remove` and tells its primary first."""
        peer = trust.require_peer(host, req.peer_fingerprint)
        return prim.removed_by_replica(host, peer, req.params["vm"], req.json())

    return r



def _follow(host, daemon, vm, first: list[dict]):
    """NDJSON: the events so far, then each new one as it happens, until the client goes."""
    import json

    def gen():
        last = 0
        for e in first:
            last = max(last, e["id"])
            yield (json.dumps(e) + "\n").encode()
        if not first:
            last = (host.store.events(vm, 0, limit=1) or [{"id": 0}])[-1]["id"]
        while not daemon.stopping():
            new = host.store.events_after(last, vm)
            for e in new:
                last = e["id"]
                yield (json.dumps(e) + "\n").encode()
            if not new:
                yield b""        # nothing yet; lets the server notice a gone client
                time.sleep(0.3)
    return gen()


def _accel_info(host) -> dict:
    """The accelerator setting and, for `auto` on the qemu driver, the machine's
    remembered probe answer (never probes)."""
    from ..hypervisor import kvmprobe
    setting = host.store.get_setting("accel", "auto")
    driver = host.store.get_setting("driver", "qemu")
    out = {"setting": setting, "driver": driver, "answer": None, "reason": None,
           "checked_at": None, "cache": str(kvmprobe.cache_path())}
    if driver != "qemu":
        out["reason"] = "libvirt's domain type: kvm only with --accel kvm"
        out["answer"] = "kvm" if setting == "kvm" else "tcg"
    elif setting != "auto":
        out["answer"], out["reason"] = setting, "set with --accel"
    else:
        found = kvmprobe.read_cache()
        if found:
            out.update(answer=found["accel"], reason=found.get("reason"),
                       checked_at=found.get("checked_at"))
    return out


def recovery_points(host, vm: str) -> list[dict]:
    """The recovery points of ``vm``: the ones its replica holds, listed on either host.
    A primary lists its replica's only: layers it kept from when it was the replica
    itself (before a reverse, a failback) are no recovery points any more — no failover
    can start from them, the VM runs on them — and listing them beside the replica's
    gave two points numbered 1 (`1 site-a`, `1 site-b`) where `failover --point 1` on
    the replica means only its own."""
    rel = host.store.relationship(vm)
    if rel is None:
        relationship_of(host, vm, role="")  # the clear "unknown VM / not replicated" error
    out = []
    if rel.chains and rel.role != "primary":
        out += rpoints.listing(host, vm)
    if rel.role == "primary":
        from ..errors import OperationError
        try:
            out += host.client_for_peer(rel.peer, timeout=30).request(
                "GET", f"/v1/replica/relationships/{vm}/points")["points"]
        except OperationError as e:
            out.append({"id": None, "host": rel.peer, "error": e.message})
    return out


def primary_view(host, peer: dict, vm: str) -> dict:
    """For ``peer``, the replica of ``vm``: whether the VM runs here, and this host's
    relationship with that replica (its main one, or the DR link). Read only, no lock."""
    from ..domain.links import dr_key
    rel = None
    for key in (vm, dr_key(vm)):
        found = host.store.relationship(key)
        if found is not None and found.peer == peer["name"]:
            rel = found
            break
    try:
        power = host.driver.inspect(vm).state
    except Exception:  # noqa: BLE001 — the answer says "unknown"; the replica then goes by state
        power = None          # not defined here, or the hypervisor cannot say
    out = {"host": host.name, "vm": vm, "vm_state": power,
           "role": rel.role if rel else "none"}
    if rel is not None:
        out |= {"state": rel.state, "epoch": rel.epoch, "mode": rel.mode,
                "sync_state": rel.sync_state, "last_cycle_at": rel.last_cycle_at,
                "last_success_at": rel.last_success_at, "fenced": bool(rel.fenced),
                "prepared": rel.state == "prepared_for_failover"}
    return out


def failover(host, vm: str, body: dict) -> dict:
    """`failover VM [--test|--stop-test|--prepare|--cancel|--complete] [--point ID] [--force]`."""
    action = body.get("action") or "start"
    rel = host.store.relationship(vm)
    if rel is None:
        relationship_of(host, vm, role="")
    point = body.get("point")
    if action == "prepare":
        return planned.prepare(host, vm, shutdown=bool(body.get("shutdown")))
    if action == "cancel" and rel.role == "primary":
        return planned.cancel(host, vm)
    actions = {
        "test": lambda: rfailover.test_start(host, vm, point, body.get("network") or "none"),
        "stop-test": lambda: rfailover.test_stop(host, vm),
        "start": lambda: rfailover.start(host, vm, point, force=bool(body.get("force"))),
        "cancel": lambda: rfailover.cancel(host, vm),
        "complete": lambda: rfailover.complete(host, vm),
    }
    if action not in actions:
        raise UsageError(f"unknown failover action {action!r}")
    return actions[action]()
