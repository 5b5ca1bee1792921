"""The management API's routes (unix socket in the home, for the CLI): every operation of
the host — the daemon itself (ping, shutdown, a dashboard login token), the host and its
KVM probe, trust, the replica server, VMs, relationships and their failover, the
cluster, status and measures, health thresholds, and the events (followed as NDJSON).
"""

from __future__ import annotations

import os
import threading
import time

from ... import __version__
from ...domain.networks import merged, parse_network_map
from ...domain.patterns import validate_pattern
from ...domain.relationship import DEFAULTS, FREQUENCY_TEXT, POINT_INTERVAL_TEXT
from ...errors import UsageError
from ...primary import relationship as prim
from ...primary import resync
from ...transport.http import Router
from .. import monitor, operations, trust, vms
from .common import failover, flag, recovery_points, settled


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
        from ...hypervisor import kvmprobe
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
                "network_map": settings.get("network_map") or {},
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
        if body.get("network_map") is not None:
            settings["network_map"] = merged(settings.get("network_map"),
                                             parse_network_map(body["network_map"]))
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
        settled(host, req.params["name"])
        return vms.show(host, req.params["name"])

    @r.route("POST", "/v1/vms/{name}/start")
    def vm_start(req):
        return vms.start(host, req.params["name"])

    @r.route("POST", "/v1/vms/{name}/stop")
    def vm_stop(req):
        return vms.stop(host, req.params["name"], flag(req, "force"),
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
                           dr=bool(b.get("dr")), network_map=b.get("network_map") or [],
                           failover_ips=b.get("failover_ips") or [])

    @r.route("POST", "/v1/relationships/{vm}/dr-adopt")
    def dr_adopt(req):
        from ...primary import dr
        b = req.json()
        return dr.adopt(host, req.params["vm"], replica=b.get("replica"),
                        resync=not b.get("no_resync"))

    @r.route("POST", "/v1/relationships/{vm}/initial")
    def initial(req):
        b = req.json()
        if b.get("import"):
            from ...replica import seeding as rseeding
            return rseeding.import_seed(host, req.params["vm"], b["import"])
        from ...primary import seeding
        return seeding.initial(host, req.params["vm"], method=b.get("method") or "network",
                               path=b.get("path"), at=b.get("at"),
                               verify=bool(b.get("verify")) or flag(req, "verify"))

    @r.route("POST", "/v1/relationships/{vm}/sync")
    def sync(req):
        return operations.sync(host, req.params["vm"], verify=flag(req, "verify"))

    @r.route("POST", "/v1/relationships/{vm}/suspend")
    def suspend(req):
        return operations.suspend(host, req.params["vm"])

    @r.route("POST", "/v1/relationships/{vm}/resume")
    def resume(req):
        return operations.resume(host, req.params["vm"])

    @r.route("DELETE", "/v1/relationships/{vm}")
    def remove(req):
        return operations.remove(host, req.params["vm"],
                                 keep_replica=flag(req, "keep_replica"),
                                 force=flag(req, "force"))

    @r.route("GET", "/v1/relationships/{vm}/points")
    def points_list(req):
        settled(host, req.params["vm"])
        return {"points": recovery_points(host, req.params["vm"])}

    @r.route("POST", "/v1/relationships/{vm}/failover")
    def failover_action(req):
        return failover(host, req.params["vm"], req.json())

    @r.route("POST", "/v1/relationships/{vm}/settings")
    def set_settings(req):
        from ...primary import settings
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
        return resync.request(host, req.params["vm"], now=flag(req, "now"))

    @r.route("GET", "/v1/cluster/status")
    def cluster_status(req):
        return operations.cluster_status(host)

    @r.route("POST", "/v1/cluster/protect")
    def cluster_protect(req):
        from ...cluster import protect
        return protect.protect(host, req.json())

    @r.route("POST", "/v1/cluster/vms/{vm}/{action}")
    def cluster_action(req):
        from ...cluster import protect
        return protect.action(host, req.params["vm"], req.params["action"], req.json())

    @r.route("POST", "/v1/relationships/{vm}/take-over")
    def take_over(req):
        from ...cluster import ops
        return ops.take_over(host, req.params["vm"])

    @r.route("POST", "/v1/relationships/{vm}/reverse")
    def reverse_action(req):
        return operations.reverse(host, req.params["vm"])

    @r.route("GET", "/v1/status")
    def status(req):
        settled(host, req.query.get("vm"))
        return {"host": host.name, "relationships": monitor.status(host, req.query.get("vm"))}

    @r.route("GET", "/v1/relationships/{vm}/measure")
    def measure(req):
        hours = req.query.get("hours")
        if hours is not None and (not str(hours).isdigit() or not 1 <= int(hours) <= 90 * 24):
            raise UsageError(f"invalid hours {hours!r}", hint="a whole number, 1 to 2160")
        settled(host, req.params["vm"])
        return monitor.measure_vm(host, req.params["vm"],
                                  int(hours) if hours else monitor.HISTORY_HOURS)

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
        if not flag(req, "follow"):
            return {"events": found}
        return _follow(host, daemon, vm, found)

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
    from ...hypervisor import kvmprobe
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
