"""VM operations of the management API: thin checks around the hypervisor driver."""

from __future__ import annotations

from ..domain.reip import FailoverIP
from ..domain.units import parse_size
from ..errors import Conflict, UsageError
from .home import validate_host_name


def role_of(host, vm: str) -> str:
    rel = host.store.relationship(vm)
    return rel.role if rel else "none"


def vm_json(host, info, tags: list[str] | None = None) -> dict:
    rel = host.store.relationship(info.name)
    return {
        "tags": host.store.tags(info.name) if tags is None else tags,
        "name": info.name, "state": info.state, "role": rel.role if rel else "none",
        "origin": info.origin,
        "memory_mb": info.memory_mb, "guest": info.guest, "pid": info.pid,
        "disks": [{"name": d.name, "path": d.path, "format": d.format, "kind": d.kind,
                   "virtual_size": d.virtual_size} for d in info.disks],
        "nics": info.nics,
        "failover_ips": [FailoverIP.from_dict(d).text() for d in rel.failover_ips]
        if rel else [],
        "reip": rel.reip if rel else None,
        "warnings": _warnings(rel),
    }


def _warnings(rel) -> list[str]:
    """What the operator must know about the VM beyond its relationship's health: a
    re-IP at failover that failed (the VM runs, without its failover addresses)."""
    if rel is None or not rel.reip or rel.reip.get("state") != "failed":
        return []
    return [f"re-IP of {rel.reip.get('vm')} failed: {rel.reip.get('message')}"]


def create(host, body: dict) -> dict:
    name = str(body.get("name", ""))
    try:
        validate_host_name(name)
    except UsageError:
        raise UsageError(f"invalid VM name {name!r}",
                         hint="use letters, digits, '-' and '.'") from None
    sizes = [_disk_size(s) for s in body.get("disks") or []]
    if not sizes:
        raise UsageError("a VM needs at least one disk", hint="add --disk SIZE, e.g. --disk 1G")
    memory = int(body.get("memory_mb") or 256)
    if memory < 32:
        raise UsageError("memory must be at least 32 MB")
    total = host_memory_mb()
    if total and memory > total:
        raise UsageError(f"memory {memory} MB is more than {host.name} has ({total} MB in all)",
                         hint=f"give --memory at most {total} (in MB); QEMU would refuse "
                              "to start the VM")
    guest = body.get("guest")
    if guest not in (None, "demo"):
        raise UsageError(f"unknown guest {guest!r}", hint="the only built-in guest is 'demo'")
    # The VM first: a replicated VM has a relationship too, and "a relationship exists"
    # hid that the name is simply taken.
    rel = host.store.relationship(name)
    if host.driver.exists(name):
        what = f" (the {rel.role} side of its replication with {rel.peer})" if rel else ""
        raise Conflict(f"a VM named {name} exists on {host.name}{what}",
                       hint="choose another name (`vmreplica vm list` shows the VMs)")
    if rel is not None:
        raise Conflict(f"{host.name} has a replication relationship named {name} "
                       f"({rel.role} side, peer {rel.peer}) without its VM",
                       hint=f"choose another name, or end it with `vmreplica remove {name}`")
    with host.vm_lock(name):
        info = host.driver.create_vm(name, sizes, memory_mb=memory, guest=guest,
                                     disk_format=body.get("format") or "qcow2",
                                     share_rw=bool(body.get("share_rw")))
    host.event("vm", f"VM created with {len(sizes)} disk(s)", name)
    return vm_json(host, info)


def _disk_size(text) -> int:
    """A disk size from the command line; a negative one gets a plain refusal."""
    t = str(text).strip()
    if t.startswith("-"):
        raise UsageError(f"disk size must be positive (got {t!r})", hint="e.g. --disk 1G")
    return parse_size(t)


def host_memory_mb() -> int | None:
    """This machine's memory in MB (MemTotal), or None if it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def show(host, name: str) -> dict:
    return vm_json(host, host.driver.inspect(name))


def list_all(host) -> list[dict]:
    tags = host.store.all_tags()
    return [vm_json(host, i, tags.get(i.name, [])) for i in host.driver.list_vms()]


def tag(host, name: str, add: list[str], remove: list[str]) -> dict:
    import re
    host.driver.inspect(name)
    for t in add:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", t):
            raise UsageError(f"invalid tag {t!r}", hint="letters, digits, '-', '_' and '.'")
    host.store.set_tags(name, add, remove)
    return vm_json(host, host.driver.inspect(name))


def start(host, name: str) -> dict:
    with host.vm_lock(name):
        info = host.driver.inspect(name)
        rel = host.store.relationship(name)
        if rel and rel.fenced:
            raise Conflict(f"{name} is fenced on {host.name}: {rel.fenced}",
                           hint=f"{rel.peer} runs this VM now; make this host its replica with "
                                f"`vmreplica reverse {name}` on {rel.peer}")
        if rel and rel.role == "replica" and rel.state not in (
                "failover_in_progress", "failed_over"):
            raise Conflict(f"{name} is a replica of {rel.peer}'s VM and cannot be started "
                           "while it is receiving replication",
                           hint=f"use failover on this host to bring it up: "
                                f"`vmreplica failover {name} --test` or `vmreplica failover {name}`")
        if rel and rel.state == "prepared_for_failover":
            raise Conflict(f"{name} is prepared for a planned failover to {rel.peer}",
                           hint=f"fail over on {rel.peer} (`vmreplica failover {name}`), or "
                                f"cancel here with `vmreplica failover {name} --cancel`")
        if info.state == "running":
            return vm_json(host, info)
        if rel and rel.role == "primary":
            _still_primary(host, name)
        host.driver.start(name)
        host.event("vm", "VM started", name)
        return vm_json(host, host.driver.inspect(name))


def _still_primary(host, name: str) -> None:
    """Before a primary's VM starts, make sure its replica has not taken over meanwhile
    (an unplanned failover while this host was down). An unreachable replica does not
    stop it: the primary site must run when the other site is gone."""
    from ..errors import OperationError, Superseded
    from ..primary.standing import check_peer
    try:
        check_peer(host, name, timeout=5)
    except Superseded as e:
        rel = host.store.relationship(name)
        raise Conflict(f"{name} is fenced on {host.name}: {e.message}",
                       hint=f"{rel.peer} runs this VM now; make this host its replica with "
                            f"`vmreplica reverse {name}` on {rel.peer}") from None
    except OperationError:
        pass


def stop(host, name: str, force: bool, timeout: float = 60.0) -> dict:
    with host.vm_lock(name):
        info = host.driver.inspect(name)
        if info.state != "running":
            return vm_json(host, info)
        host.driver.stop(name, force=force, timeout=timeout)
        host.event("vm", "VM stopped" + (" (forced)" if force else ""), name)
        return vm_json(host, host.driver.inspect(name))


def delete(host, name: str) -> dict:
    with host.vm_lock(name):
        host.driver.inspect(name)
        rel = host.store.relationship(name)
        if rel is not None:
            raise Conflict(f"{name} is replicated ({rel.role} side, peer {rel.peer})",
                           hint=f"remove replication first: `vmreplica remove {name}`")
        from ..domain.links import dr_key
        if host.store.relationship(dr_key(name)) is not None:
            raise Conflict(f"{name} has a DR link", hint=f"remove it first: `vmreplica remove "
                                                         f"{dr_key(name)}`")
        host.driver.delete(name)
        host.store.set_tags(name, [], host.store.tags(name))
    host.event("vm", "VM deleted", name)
    return {"name": name, "deleted": True}

