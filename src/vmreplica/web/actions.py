"""What the operator can do from the dashboard: the actions a VM's page offers, by role and
state, and running one (`POST /vm/NAME/action`). The same table decides (server side)
whether a posted action is allowed now.

Every action needs the session's CSRF token and a confirmation (a JS confirm(), or the
confirmation page the server answers with when the form arrives unconfirmed). Actions run
in the request and end in a redirect back to the VM's page, which shows their result or
error (message and hint, never a stack trace).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, quote

from ..domain.relationship import Relationship
from ..domain.states import State, suspend_allowed
from ..domain.units import format_duration, format_size
from ..errors import VmreplicaError
from ..service import operations
from ..service.api.common import failover
from ..transport.http import Response
from .layout import clock, e, error_page, login_needed, page

log = logging.getLogger("vmreplica.web")

MAX_FORM = 64 << 10


# Actions a VM's page offers, by role and state. The same table decides (server side)
# whether a posted action is allowed now.

def _actions(host, rel: Relationship) -> list[dict]:
    vm, peer, state = rel.vm, rel.peer, rel.state
    acts: list[dict] = []

    def add(name, label, confirm, style="", point=False):
        acts.append({"name": name, "label": label, "confirm": confirm, "style": style,
                     "point": point})

    if rel.role == "primary":
        if rel.fenced:
            return acts
        if state in (State.REPLICATING.value, State.ERROR.value):
            add("sync", "Sync now", f"Run a replication cycle of {vm} to {peer} now?", "go")
        if state == State.SUSPENDED.value:
            add("resume", "Resume", f"Resume the replication of {vm} to {peer}?", "go")
        elif suspend_allowed(state):
            add("suspend", "Suspend", f"Suspend the replication of {vm}? Changes stay tracked "
                                      "and ship when it is resumed.")
        if state == State.REPLICATING.value:
            add("prepare", "Prepare planned failover",
                f"Prepare a planned failover of {vm} to {peer}? The VM is shut down on "
                f"{host.name}, a final cycle ships its last writes, and it stays off until "
                f"{peer} fails over (or you cancel).", "danger")
        if state == State.PREPARED_FOR_FAILOVER.value:
            add("cancel-prepare", "Cancel planned failover",
                f"Cancel the planned failover of {vm}? Replication to {peer} goes on.")
        return acts

    test = rel.test
    if test:
        add("stop-test", "Stop test failover",
            f"Stop the test failover? {test['vm']} is powered off and deleted with its files.",
            "danger")
    elif state in (State.REPLICATING.value, State.SUSPENDED.value):
        add("test", "Test failover",
            f"Start a test failover of {vm} from point {{point}}? {vm}-test starts on "
            f"{host.name} (no network); replication goes on.", "go", point=True)
    if not test and state in (State.REPLICATING.value, State.SUSPENDED.value, State.ERROR.value):
        if _planned_ready(rel):
            add("failover", "Fail over (planned)",
                f"Fail {vm} over to {host.name}? {peer} prepared it: the VM starts here from its "
                "final cycle (zero loss) and the failover is committed at once.", "danger")
        else:
            add("failover", "Fail over (unplanned)",
                f"Fail {vm} over to {host.name} from point {{point}}? Do this when {peer} is "
                f"lost: {vm} starts here; then Complete (commit) or Cancel. Refused while "
                f"{peer} answers and runs {vm}.", "danger", point=True)
            add("force-failover", "Force failover",
                f"Fail {vm} over to {host.name} from point {{point}} even if {peer} still "
                f"runs it? Every write made on {peer} since that point is discarded at "
                "reverse.", "danger", point=True)
    if state == State.FAILOVER_IN_PROGRESS.value:
        add("complete", "Complete failover",
            f"Complete the failover of {vm}? The chosen point becomes its disk, the other "
            f"recovery points are deleted and {peer} can no longer replicate into it.", "danger")
        add("cancel", "Cancel failover",
            f"Cancel the failover of {vm}? It is powered off and what it wrote is discarded.")
    if state == State.FAILED_OVER.value:
        add("reverse", "Reverse replication",
            f"Reverse the replication of {vm}? {host.name} becomes its primary and {peer} "
            "its replica; only the blocks that differ are copied.", "go")
    return acts


def _planned_ready(rel: Relationship) -> bool:
    prepared = rel.primary_prepared
    if not prepared:
        return False
    return int(prepared["cycle"]) == rel.last_applied_cycle


def _point_select(pts: list[dict]) -> str:
    opts = []
    seen = set()
    choices = [("latest", "latest (newest state)")]
    for p in reversed(pts):
        if p.get("error") or p.get("id") in (None, "latest") or p["id"] in seen:
            continue
        seen.add(p["id"])
        choices.append((str(p["id"]), f"{p['id']} · {p.get('kind')} · {clock(p.get('time'))}"))
    for value, text in choices:
        sel = " selected" if value == "latest" else ""
        opts.append(f'<option value="{e(value)}"{sel}>{e(text)}</option>')
    return f'<label>point <select name="point">{"".join(opts)}</select></label>'


def actions_html(host, rel: Relationship, session: dict, pts: list[dict]) -> str:
    acts = _actions(host, rel)
    if not acts:
        if rel.fenced:
            return f'<p class="empty">Fenced: {e(rel.fenced)}</p>'
        return '<p class="empty">No action in this state.</p>'
    local = [p for p in pts if p.get("host") == host.name]
    forms = []
    for a in acts:
        point = _point_select(local) if a["point"] else ""
        forms.append(
            f'<form method="post" action="/vm/{quote(rel.vm, safe="")}/action" '
            f'data-confirm="{e(a["confirm"])}" data-action="{e(a["name"])}">'
            f'<input type="hidden" name="csrf" value="{e(session["csrf"])}">'
            f'<input type="hidden" name="action" value="{e(a["name"])}">'
            f'<input type="hidden" name="confirmed" value="">{point}'
            f'<button type="submit" class="btn {e(a["style"])}" name="do" '
            f'value="{e(a["name"])}">{e(a["label"])}</button></form>')
    return (f'<div class="actions">{"".join(forms)}'
            '<span class="busy-note muted">working&hellip; (this can take a few seconds)</span></div>')


# -- running one ----------------------------------------------------------------------------------

def _run_action(host, rel: Relationship, action: str, point: str | None) -> tuple[str, str]:
    """Run one action; returns (title, what happened). Raises VmreplicaError."""
    vm, peer = rel.vm, rel.peer
    if action == "sync":
        s = operations.sync(host, vm)
        return "Sync done", (f"cycle {s['cycle']} acknowledged by {peer} in "
                             f"{format_duration(s.get('seconds'))}: "
                             f"{format_size(s.get('raw_bytes', 0))} changed, "
                             f"{format_size(s.get('wire_bytes', 0))} sent")
    if action == "suspend":
        operations.suspend(host, vm)
        return "Suspended", f"replication of {vm} is suspended; changes stay tracked"
    if action == "resume":
        r = operations.resume(host, vm)
        return "Resumed", f"replication of {vm} resumed (state {r['state']})"
    if action == "prepare":
        r = failover(host, vm, {"action": "prepare", "shutdown": True})
        return "Prepared for planned failover", (
            f"final cycle {r['final_cycle']} acknowledged ({format_size(r['raw_bytes'])} "
            f"shipped); next: {r['next']}")
    if action == "cancel-prepare":
        failover(host, vm, {"action": "cancel"})
        return "Planned failover cancelled", f"replication of {vm} to {peer} goes on"
    if action == "test":
        r = failover(host, vm, {"action": "test", "point": point or "latest"})
        return "Test failover started", (f"test failover started: {r['test_vm']} runs from "
                                         f"point {r['point']} (started in {r['seconds']:.2f} s, "
                                         f"network {r['network']}); replication goes on")
    if action == "stop-test":
        r = failover(host, vm, {"action": "stop-test"})
        return "Test failover stopped", f"test failover stopped: {r['stopped']} and its files deleted"
    if action in ("failover", "force-failover"):
        chosen = None if point in (None, "", "latest") else point
        r = failover(host, vm, {"action": "start", "point": chosen,
                                "force": action == "force-failover"})
        kind = "planned" if r.get("planned") else "unplanned"
        return f"Failed over ({kind})", (f"{vm} runs on {host.name} from point {r['point']} "
                                         f"(state {r['state']}); next: {r['next']}")
    if action == "complete":
        r = failover(host, vm, {"action": "complete"})
        return "Failover completed", f"{vm} is failed over (epoch {r['epoch']}); next: {r['next']}"
    if action == "cancel":
        r = failover(host, vm, {"action": "cancel"})
        return "Failover cancelled", f"what {vm} wrote was discarded (state {r['state']})"
    if action == "reverse":
        r = operations.reverse(host, vm)
        moved, total = r["bytes_moved"], r["disk_bytes"]
        return "Replication reversed", (
            f"{r['primary']} is the primary of {vm}, {r['replica']} its replica (epoch "
            f"{r['epoch']}); moved {format_size(moved)} of {format_size(total)} in "
            f"{r['seconds']:.1f} s")
    raise VmreplicaError(f"unknown action {action!r}")


def read_form(req) -> dict[str, str]:
    """A form the dashboard posted (its fields, the last value of each)."""
    body = req.body()
    data = b""
    while True:
        piece = body.read(16 << 10)
        if not piece:
            break
        data += piece
        if len(data) > MAX_FORM:
            raise VmreplicaError("the form is too large")
    fields = parse_qs(data.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in fields.items()}


def _confirm_page(host, session, rel: Relationship, act: dict, form: dict) -> Response:
    point = form.get("point") or "latest"
    text = act["confirm"].replace("{point}", point)
    hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(form.get(k, ""))}">'
                     for k in ("action", "point") if k in form)
    return page(f"vmreplica: confirm {act['label']}", (
        f'<div class="card confirm" id="confirm"><h1>{e(act["label"])}: {e(rel.vm)}</h1>'
        f'<p>{e(text)}</p>'
        f'<form method="post" action="/vm/{quote(rel.vm, safe="")}/action">'
        f'<input type="hidden" name="csrf" value="{e(session["csrf"])}">{hidden}'
        f'<input type="hidden" name="confirmed" value="1">'
        f'<button type="submit" class="btn {e(act["style"])}">Yes, {e(act["label"].lower())}'
        f'</button><a href="/vm/{quote(rel.vm, safe="")}">No, back</a></form></div>'),
        host=host, session=session, script=False)


def _flash(session: dict, vm: str, kind: str, title: str, text: str, hint: str | None = None):
    session.setdefault("flash", []).append(
        {"vm": vm, "kind": kind, "title": title, "text": text, "hint": hint})
    del session["flash"][:-5]


def handle(host, sessions, req, name: str) -> Response:
    """A posted action form: session, CSRF token and whether the VM offers the action now
    are checked; then the confirmation page, or the action is run and the answer is a
    redirect back to the VM's page with its result."""
    session = sessions.get(req.headers.get("Cookie"))
    if session is None:
        return login_needed()
    form = read_form(req)
    if not sessions.csrf_ok(session, form.get("csrf")):
        return error_page(host, session, "Refused",
                          "This action's form has no valid security (CSRF) token.",
                          "Reload the VM's page and try again.", status=403)
    rel = host.store.relationship(name)
    if rel is None:
        return error_page(host, session, "Not replicated",
                          f"{name} is not replicated on {host.name}.", status=404)
    action = form.get("action", "")
    act = next((a for a in _actions(host, rel) if a["name"] == action), None)
    if act is None:
        return error_page(host, session, "Not available",
                          f"{action or 'this action'} is not available for {name} as "
                          f"{rel.role} in state {rel.state}.",
                          "The page may have been out of date; look at it again.", status=409)
    if form.get("confirmed") != "1":
        return _confirm_page(host, session, rel, act, form)
    point = form.get("point") or None
    log.info("dashboard action %s on %s (point %s)", action, name, point)
    try:
        title, text = _run_action(host, rel, action, point)
        _flash(session, name, "ok", title, text)
    except VmreplicaError as err:
        _flash(session, name, "error", f"{act['label']} failed", err.message, err.hint)
    except Exception:  # noqa: BLE001 — the user sees a message, the log the trace
        log.exception("dashboard action %s on %s failed", action, name)
        _flash(session, name, "error", f"{act['label']} failed",
               "internal error; the daemon's log has the details")
    return Response.redirect(f"/vm/{quote(name, safe='')}")
