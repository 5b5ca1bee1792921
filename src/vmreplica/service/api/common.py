"""What the two APIs share, and the dashboard runs too: a yes/no flag of a request's
query, and the recovery points and failover actions the management API's routes and the
dashboard's actions (web.actions) both call, and the wait of a view for an acknowledged cycle's apply.
"""

from __future__ import annotations

from ...errors import UsageError
from ...primary import planned
from ...primary.common import relationship_of
from ...replica import failover as rfailover
from ...replica import points as rpoints
from ...transport.http import Request


def flag(req: Request, name: str) -> bool:
    return req.query.get(name, "") in ("1", "true", "yes")


def settled(host, vm: str | None) -> None:
    """Before a view of ``vm`` (of every VM: None): the apply of a cycle this replica has
    acknowledged, waited for (replica.applies), so that no view shows the replica as it
    was before a cycle it acknowledged."""
    if vm:
        host.applies.wait(host.lock_key(vm))
    else:
        host.applies.wait_all()


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
        from ...errors import OperationError
        try:
            out += host.client_for_peer(rel.peer, timeout=30).request(
                "GET", f"/v1/replica/relationships/{vm}/points")["points"]
        except OperationError as e:
            out.append({"id": None, "host": rel.peer, "error": e.message})
    return out


def failover(host, vm: str, body: dict) -> dict:
    """`failover VM [--test [--re-ip]|--stop-test|--prepare|--cancel|--complete] [--point ID]
    [--force]`."""
    action = body.get("action") or "start"
    rel = host.store.relationship(vm)
    if rel is None:
        relationship_of(host, vm, role="")
    point = body.get("point")
    if body.get("re_ip") and action != "test":
        raise UsageError("--re-ip is for a test failover (--test)",
                         hint="a planned or unplanned failover sets the failover IPs of a VM "
                              "that has them by itself")
    if action == "prepare":
        return planned.prepare(host, vm, shutdown=bool(body.get("shutdown")))
    if action == "cancel" and rel.role == "primary":
        return planned.cancel(host, vm)
    actions = {
        "test": lambda: rfailover.test_start(host, vm, point, body.get("network") or None,
                                             re_ip=bool(body.get("re_ip"))),
        "stop-test": lambda: rfailover.test_stop(host, vm),
        "start": lambda: rfailover.start(host, vm, point, force=bool(body.get("force"))),
        "cancel": lambda: rfailover.cancel(host, vm),
        "complete": lambda: rfailover.complete(host, vm),
    }
    if action not in actions:
        raise UsageError(f"unknown failover action {action!r}")
    return actions[action]()
