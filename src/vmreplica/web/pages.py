"""Dashboard pages, rendered on the server: the VM list (`/`), a VM's page (`/vm/NAME`)
with its figures, recovery points, cycle chart, events and actions, and the actions
themselves (`POST /vm/NAME/action`).

Every page and action needs a session (`auth.Sessions`); every action needs the
session's CSRF token and a confirmation (a JS confirm(), or the confirmation page the
server answers with when the form arrives unconfirmed). Actions run in the request and
end in a redirect back to the VM's page, which shows their result or error (message and
hint, never a stack trace). Everything shown is escaped.
"""

from __future__ import annotations

import html
import logging
import secrets
import time
from urllib.parse import parse_qs, quote

from ..domain.relationship import Relationship
from ..domain.states import State, suspend_allowed
from ..domain.units import format_duration, format_size
from ..errors import NotFound, VmreplicaError
from ..service import api, monitor, operations, vms
from ..transport.http import Response
from . import assets

log = logging.getLogger("vmreplica.web")

MAX_FORM = 64 << 10
CHART_CYCLES = 40
EVENTS_SHOWN = 40


def e(value) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


# -- page frame -----------------------------------------------------------------------------

def _headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"),
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def _page(title: str, body: str, *, host=None, session: dict | None = None,
          status: int = 200, script: bool = True, refresh_fallback: bool = False) -> Response:
    nonce = secrets.token_urlsafe(12)
    top = ""
    if host is not None:
        logout = ""
        if session is not None:
            logout = (f'<form method="post" action="/logout">'
                      f'<input type="hidden" name="csrf" value="{e(session["csrf"])}">'
                      f'<button type="submit">Log out</button></form>')
        top = (f'<header class="top"><a class="brand" href="/">vmreplica</a>'
               f'<span class="host" id="host-name">{e(host.name)}</span>'
               f'<span class="addr">replication {e(host.listen)}</span>'
               f'<span class="spacer"></span>{logout}</header>')
    noscript = ('<noscript><meta http-equiv="refresh" content="10"></noscript>'
                if refresh_fallback else "")
    js = f'<script nonce="{nonce}">{assets.JS}</script>' if script else ""
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f'<title>{e(title)}</title>{noscript}<style nonce="{nonce}">{assets.CSS}</style>'
           f'</head><body>{top}<main>{body}</main>{js}</body></html>')
    return Response(doc, status=status, headers=_headers(nonce))


def message(text: str) -> str:
    """A small standalone page (login errors, logout); used by `web.app`."""
    nonce = secrets.token_urlsafe(12)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vmreplica</title>'
            f'<style nonce="{nonce}">{assets.CSS}</style></head><body>'
            f'<header class="top"><span class="brand">vmreplica</span></header>'
            f'<main><div class="card"><p>{e(text)}</p></div></main></body></html>')


def _fragment(html_text: str) -> Response:
    return Response(html_text, headers={"Cache-Control": "no-store",
                                        "X-Content-Type-Options": "nosniff"})


def _login_needed() -> Response:
    return _page("vmreplica: log in", (
        '<div class="card"><h1>Log in needed</h1>'
        '<p>This dashboard needs a session. On the host, run '
        '<code>vmreplica dashboard</code> and open the one-time address it prints '
        '(valid once, for 10 minutes).</p></div>'), status=401, script=False)


def _error_page(host, session, title: str, text: str, hint: str | None = None,
                status: int = 400) -> Response:
    hint_html = f'<div class="hint">{e(hint)}</div>' if hint else ""
    return _page(f"vmreplica: {title}", (
        f'<div class="flash error"><strong>{e(title)}</strong><div>{e(text)}</div>'
        f'{hint_html}</div><p><a href="/">&larr; all VMs</a></p>'),
        host=host, session=session, status=status, script=False)


# -- small renderers ---------------------------------------------------------------------------

def _when(ts) -> str:
    if not ts:
        return '<span class="muted">never</span>'
    full = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f'<span title="{e(full)}">{e(_ago(ts))}</span>'


def _ago(ts) -> str:
    if not ts:
        return "never"
    return format_duration(max(0.0, time.time() - ts)) + " ago"


def _clock(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _size(n) -> str:
    return "-" if n is None else format_size(n)


def _health(level: str, reasons: list[str]) -> str:
    tip = "; ".join(reasons) or "all is well"
    return f'<span class="pill {e(level)} health" title="{e(tip)}">{e(level)}</span>'


def _reasons(level: str, reasons: list[str]) -> str:
    if not reasons:
        return ""
    items = "".join(f'<li class="{e(level)}">{e(r)}</li>' for r in reasons)
    return f'<ul class="reasons">{items}</ul>'


def _power(state: str | None) -> str:
    if not state:
        return '<span class="muted">-</span>'
    cls = "running" if state == "running" else "off"
    return f'<span class="pill {cls}">{e(state)}</span>'


def _tags(tags) -> str:
    return "".join(f' <span class="tag">{e(t)}</span>' for t in tags or [])


def _running(op: dict | None) -> str:
    """The operation running on a VM now (a cycle, an initial copy, a resync): its phase,
    or bytes done of total with the percentage, rate and time left."""
    if not op:
        return ""
    if "done" not in op:
        text = f'{op["label"]}: {op.get("phase") or "starting"}'
        bar = ""
    else:
        rate = f', {format_size(op["rate_bps"])}/s' if op.get("rate_bps") else ""
        left = (f', ETA {format_duration(op["eta_seconds"])}'
                if op.get("eta_seconds") is not None else "")
        after = f'; {op["phase"]}' if op["done"] >= op["total"] and op.get("phase") else ""
        text = (f'{op["label"]}: {op["percent"]:.1f} % ({format_size(op["done"])} of '
                f'{format_size(op["total"])}{rate}{left}){after}')
        bar = f'<progress max="100" value="{op["percent"]:.1f}"></progress> '
    return f'<div class="small running" data-kind="{e(op["kind"])}">{bar}{e(text)}</div>'


def _vm_link(name: str) -> str:
    return f'<a href="/vm/{quote(name, safe="")}">{e(name)}</a>'


def _kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _stamp() -> str:
    return f'<p class="stamp">as of {e(time.strftime("%H:%M:%S"))} &middot; refreshes every 5 s</p>'


# -- cluster ---------------------------------------------------------------------------------------

_CLUSTER_COLOUR = {"PRIM": "normal", "SECOND": "normal", "ALONE": "warning", "WAIT": "warning",
                   "STOP": "critical"}


def cluster_section(host) -> str:
    """The Pacemaker cluster this host belongs to, when it protects VMs: nodes (online or
    not, quorum) and each VM's SafeKit-style state on each node. Empty otherwise."""
    if not any(r.cluster for r in host.store.relationships()):
        return ""
    try:
        st = operations.cluster_status(host)
    except VmreplicaError as err:
        return (f'<div class="card stack"><h2>Cluster</h2>'
                f'<div class="flash error">{e(err.message)}</div></div>')
    nodes = list(st["nodes"])
    head = " ".join(f'<span class="pill {"normal" if up else "critical"}">{e(n)} '
                    f'{"online" if up else "offline"}</span>' for n, up in st["nodes"].items())
    quorum = '<span class="pill normal">quorum</span>' if st["quorum"] else \
        '<span class="pill critical">no quorum</span>'
    rows = []
    for v in st["vms"]:
        cells = "".join(
            f'<td data-node="{e(n)}"><span class="pill {_CLUSTER_COLOUR.get(v["states"].get(n), "")}">'
            f'{e(v["states"].get(n, "-"))}</span></td>' for n in nodes)
        fails = ", ".join(f"{e(n)}: {c}" for n, c in v["failcounts"].items() if c) or "-"
        rows.append(f'<tr data-vm="{e(v["vm"])}"><td><strong>{_vm_link(v["vm"])}</strong></td>'
                    f'<td>{e(", ".join(v["running_on"]) or "-")}</td>{cells}'
                    f'<td>{"yes" if v["in_sync"] else "no"}</td><td>{fails}</td></tr>')
    ths = "".join(f"<th>{e(n)}</th>" for n in nodes)
    return (f'<div class="card stack"><h2>Cluster {head} {quorum}</h2>'
            f'<table class="vms compact" id="cluster-vms"><thead><tr><th>VM</th><th>Runs on</th>'
            f'{ths}<th>In sync</th><th>Failures</th></tr></thead><tbody>{"".join(rows)}'
            f'</tbody></table></div>')


# -- index -------------------------------------------------------------------------------------------

def _index_live(host) -> str:
    views = monitor.status(host)
    try:
        all_vms = vms.list_all(host)
        vm_error = None
    except VmreplicaError as err:
        all_vms, vm_error = [], err.message
    power = {v["name"]: v["state"] for v in all_vms}
    tests = {v["test_vm"]: v["vm"] for v in views if v.get("test_vm")}

    out = [_stamp(), f'<div class="cluster" id="cluster">{cluster_section(host)}</div>']
    counts = {lvl: sum(1 for v in views if v["health"] == lvl)
              for lvl in ("normal", "warning", "critical")}
    summary = " ".join(f'<span class="pill {lvl}">{n} {lvl}</span>'
                       for lvl, n in counts.items() if n)
    out.append(f'<div class="card stack"><h2>Replicated VMs {summary}</h2>')
    if not views:
        out.append('<p class="empty">No VM of this host is replicated. '
                   'Protect one with <code>vmreplica enable VM --replica HOST:PORT</code>.</p>')
    else:
        out.append('<table class="vms" id="replicated"><thead><tr><th>Health</th><th>VM</th>'
                   '<th>Power</th><th>Role</th><th>Peer</th><th>State</th><th>Mode</th>'
                   '<th>Schedule</th><th>Last sync</th><th class="num">Lag</th><th>Reasons / next step</th>'
                   '</tr></thead><tbody>')
        for v in views:
            nxt = (f'<div class="small muted">next: <code>{e(v["next"])}</code></div>'
                   if v.get("next") else "")
            reasons = _reasons(v["health"], v["reasons"]) or \
                '<span class="small muted">all is well</span>'
            out.append(
                f'<tr class="rel health-{e(v["health"])}" data-vm="{e(v["vm"])}" '
                f'data-health="{e(v["health"])}">'
                f'<td>{_health(v["health"], v["reasons"])}</td>'
                f'<td><strong>{_vm_link(v["vm"])}</strong>{_tags(v.get("tags"))}</td>'
                f'<td>{_power(power.get(v["vm"]))}</td>'
                f'<td><span class="pill role">{e(v["role"])}</span></td>'
                f'<td>{e(v["peer"])}</td><td class="state">{e(v["state"])}'
                f'{_running(v.get("activity"))}</td>'
                f'<td>{e(v["mode"])}</td><td>{e(v["mode_label"])}</td>'
                f'<td class="nowrap">{_when(v["last_cycle_at"])}</td>'
                f'<td class="num">{e(format_duration(v["lag_seconds"]))}</td>'
                f'<td class="why">{reasons}{nxt}</td></tr>')
        out.append("</tbody></table>")
    out.append("</div>")

    replicated = {v["vm"] for v in views}
    others = [v for v in all_vms if v["name"] not in replicated]
    out.append('<div class="card stack"><h2>VMs without replication</h2>')
    if vm_error:
        out.append(f'<div class="flash error">{e(vm_error)}</div>')
    if not others:
        out.append('<p class="empty">None.</p>')
    else:
        out.append('<table class="vms compact" id="unreplicated"><thead><tr><th>VM</th>'
                   '<th>Power</th><th class="num">Memory</th><th>Disks</th><th>Guest</th>'
                   '<th>Note</th></tr></thead><tbody>')
        for v in others:
            disks = v.get("disks") or []
            total = sum(int(d.get("virtual_size") or 0) for d in disks)
            note = ""
            if v["name"] in tests:
                note = f'test failover of {_vm_link(tests[v["name"]])}'
            out.append(
                f'<tr data-vm="{e(v["name"])}"><td><strong>{_vm_link(v["name"])}</strong>'
                f'{_tags(v.get("tags"))}</td>'
                f'<td>{_power(v["state"])}</td>'
                f'<td class="num">{e(v.get("memory_mb"))} MB</td>'
                f'<td class="nowrap">{len(disks)} &middot; {e(format_size(total))}</td>'
                f'<td>{e(v.get("guest") or "-")}</td><td>{note}</td></tr>')
        out.append("</tbody></table>")
    out.append("</div>")
    return "".join(out)


def _index(host, session) -> Response:
    body = f'<div id="live" data-src="/live/index">{_index_live(host)}</div>'
    return _page(f"vmreplica: {host.name}", body, host=host, session=session,
                 refresh_fallback=True)


# -- VM page -----------------------------------------------------------------------------------------

def _chart(host, vm: str, rel: Relationship) -> str:
    rows = list(reversed(host.store.cycles(vm, limit=CHART_CYCLES)))
    rows = [c for c in rows if c.finished_at]
    if not rows:
        where = (f"Cycle history is recorded on the primary ({e(rel.peer)})."
                 if rel.role == "replica" else "No cycle yet.")
        return f'<p class="empty">{where}</p>'
    W, H, left, top, bottom = 1160, 170, 64, 10, 22
    plot_h = H - top - bottom
    deltas = [int(c.raw_bytes or 0) for c in rows if c.ok and c.kind == "delta"]
    scale = max(deltas or [int(c.raw_bytes or 0) for c in rows if c.ok] or [1]) or 1
    slot = (W - left - 8) / CHART_CYCLES
    bw = max(3.0, slot * 0.72)
    parts = [(f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" '
              f'aria-label="bytes changed per cycle, last {len(rows)} cycles">')]
    for frac in (0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{left}" x2="{W - 4}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{e(format_size(scale * frac))}</text>')
    base = top + plot_h
    parts.append(f'<line class="axis" x1="{left}" x2="{W - 4}" y1="{base}" y2="{base}"/>'
                 f'<text x="{left - 6}" y="{base + 4}" text-anchor="end">0</text>')
    first = CHART_CYCLES - len(rows)          # the newest cycle at the right edge
    for i, c in enumerate(rows):
        x = left + 4 + (first + i) * slot
        raw = int(c.raw_bytes or 0)
        secs = (c.finished_at - c.started_at) if c.finished_at else None
        h: float
        if not c.ok:
            cls, h = "bar failed", plot_h
            tip = f"cycle {c.cycle} failed at {_clock(c.started_at)}: {c.error or ''}"
        else:
            h = max(1.5, plot_h * min(raw, scale) / scale)
            cls = f"bar {c.kind}" + (" clipped" if raw > scale else "")
            tip = (f"cycle {c.cycle} ({c.kind}) at {_clock(c.started_at)}: "
                   f"{format_size(raw)} changed, {format_size(c.wire_bytes or 0)} sent, "
                   f"{format_duration(secs)}" + (" (off the scale)" if raw > scale else ""))
        parts.append(f'<rect class="{e(cls)}" data-bytes="{raw}" x="{x:.1f}" '
                     f'y="{base - h:.1f}" width="{bw:.1f}" height="{h:.1f}">'
                     f'<title>{e(tip)}</title></rect>')
        if i in (0, len(rows) - 1):
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{H - 6}" text-anchor="middle">'
                         f'#{e(c.cycle)}</text>')
    parts.append("</svg>")
    legend = ('<div class="legend"><span><i class="delta"></i>delta</span>'
              '<span><i class="initial"></i>initial / resync (may be off the scale)</span>'
              '<span><i class="failed"></i>failed</span>'
              f'<span>scale: largest delta, {e(format_size(scale))}</span></div>')
    return "".join(parts) + legend


def _points_table(pts: list[dict]) -> str:
    if not pts:
        return '<p class="empty">No recovery point yet.</p>'
    rows = []
    for p in reversed(pts):
        if p.get("error"):
            rows.append(f'<tr class="point-error"><td>?</td><td>{e(p.get("host"))}</td>'
                        f'<td colspan="3" class="small">{e(p["error"])}</td></tr>')
            continue
        rows.append(f'<tr data-point="{e(p["id"])}"><td>{e(p["id"])}</td>'
                    f'<td>{e(p.get("host"))}</td>'
                    f'<td class="nowrap">{e(_clock(p.get("time")))} '
                    f'<span class="small muted">({e(_ago(p.get("time")))})</span></td>'
                    f'<td>{e(p.get("kind"))}</td><td class="num">{e(_size(p.get("size")))}</td></tr>')
    return ('<table id="points"><thead><tr><th>Point</th><th>Host</th><th>Time</th><th>Kind</th>'
            f'<th>Size</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _events_table(host, vm: str) -> str:
    events = host.store.events(vm, limit=EVENTS_SHOWN)[::-1]
    if not events:
        return '<p class="empty">No events.</p>'
    rows = "".join(f'<tr><td class="nowrap small">{e(_clock(ev["ts"]))}</td>'
                   f'<td class="kind small">{e(ev["kind"])}</td><td>{e(ev["message"])}</td></tr>'
                   for ev in events)
    return (f'<div class="scroll"><table class="events" id="events"><thead><tr><th>Time</th>'
            f'<th>Kind</th><th>Event</th></tr></thead><tbody>{rows}</tbody></table></div>')


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
        choices.append((str(p["id"]), f"{p['id']} · {p.get('kind')} · {_clock(p.get('time'))}"))
    for value, text in choices:
        sel = " selected" if value == "latest" else ""
        opts.append(f'<option value="{e(value)}"{sel}>{e(text)}</option>')
    return f'<label>point <select name="point">{"".join(opts)}</select></label>'


def _actions_html(host, rel: Relationship, session: dict, pts: list[dict]) -> str:
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


def _vm_live(host, name: str, session: dict) -> str:
    rel = host.store.relationship(name)
    try:
        info = vms.show(host, name)
    except NotFound:
        info = None
    if rel is None:
        return _plain_vm(host, name, info)
    v = monitor.view(host, rel)
    try:
        pts = api.recovery_points(host, name)
    except VmreplicaError as err:
        pts = [{"id": None, "host": host.name, "error": err.message}]

    status_rows = [
        ("health", _health(v["health"], v["reasons"]) + _reasons(v["health"], v["reasons"])),
        ("role / peer", f'{e(v["role"])} &middot; {e(v["peer"])}'),
        ("state", (f'<span class="state">{e(v["state"])}</span>'
                   f'{_running(v.get("activity"))}')),
        ("power", _power(info["state"] if info else None)),
        ("mode / frequency", e(v["mode"]) + " &middot; " +
         (f'every {e(v["frequency"])}' if v["mode"] == "periodic" else e(v["mode_label"]))),
        ("last sync", _when(v["last_cycle_at"])),
        ("lag", e(format_duration(v["lag_seconds"]))),
        ("cycle / epoch", f'{e(v["cycle"])} &middot; epoch {e(v["epoch"])}'),
        ("disks", e(", ".join(v["disks"]))),
    ]
    if v.get("test_vm"):
        status_rows.append(("test failover", f'{_vm_link(v["test_vm"])} running'))
    if v.get("next"):
        status_rows.append(("next step", f'<code>{e(v["next"])}</code>'))
    if v.get("last_error"):
        status_rows.append(("last error", f'<span class="small">{e(v["last_error"])}</span>'))

    if rel.role == "replica":
        figures, measure_rows = "Replica", _replica_figures(host, rel)
    else:
        figures = 'Measure <span class="small muted">(last 12 h)</span>'
        measure_rows = _primary_figures(monitor.measure_vm(host, name))
    return "".join([
        _stamp(),
        (f'<div class="card stack" id="actions-card"><h2>Actions</h2>'
         f'{_actions_html(host, rel, session, pts)}</div>'),
        '<div class="grid stack">',
        f'<div class="card" id="status"><h2>Status</h2>{_kv(status_rows)}</div>',
        f'<div class="card" id="measure"><h2>{figures}</h2>{_kv(measure_rows)}</div>',
        '</div>',
        (f'<div class="card stack" id="chart"><h2>Cycle history '
         f'<span class="small muted">(bytes changed per cycle, last {CHART_CYCLES})</span></h2>'
         f'{_chart(host, name, rel)}</div>'),
        '<div class="grid stack">',
        f'<div class="card"><h2>Recovery points</h2>{_points_table(pts)}</div>',
        f'<div class="card"><h2>Events</h2>{_events_table(host, name)}</div>',
        '</div>',
    ])


def _replica_figures(host, rel: Relationship) -> list[tuple[str, str]]:
    """What a replica knows about itself (the cycle statistics live on the primary)."""
    interval = rel.point_interval
    return [
        ("last cycle applied", (f'{e(rel.last_applied_cycle)} &middot; '
                                f'{_when(rel.last_applied_at)}')),
        ("newest state from", e(_clock(rel.last_freeze_at))),
        ("recovery points", (f'{e(len(host.store.points(rel.vm)))} kept of '
                             f'{e(rel.history)} asked for')),
        ("staged, not applied", e(len(host.store.staged(rel.vm)))),
        ("storage", f'<span class="small">{e(rel.storage or "-")}</span>'),
    ] + ([("point interval", e(format_duration(interval)))] if interval else [])


def _primary_figures(m: dict) -> list[tuple[str, str]]:
    pending = "-" if m.get("pending_bytes") is None else format_size(m["pending_bytes"])
    tput = f'{format_size(m["throughput_bps"])}/s' if m.get("throughput_bps") else "-"
    return [
        ("cycles", (f'{e(m["cycles"])} done &middot; {e(m["expected_cycles"])} expected '
                    'on schedule')),
        ("missed / failed", (f'{e(m["missed_cycles"])} missed ({e(m["missed_pct"])} %) '
                             f'&middot; {e(m["errors"])} failed')),
        ("cycle size", (f'avg {e(format_size(m["avg_cycle_bytes"]))} &middot; '
                        f'max {e(format_size(m["max_cycle_bytes"]))}')),
        ("cycle duration", (f'avg {e(format_duration(m["avg_cycle_seconds"]))} &middot; '
                            f'max {e(format_duration(m["max_cycle_seconds"]))}')),
        ("bytes", (f'{e(format_size(m["bytes_raw"]))} changed &middot; '
                   f'{e(format_size(m["bytes_sent"]))} sent')),
        ("throughput", e(tput)),
        ("pending", e(pending)),
        ("last cycle error", e(m.get("last_error") or "-")),
    ]


def _plain_vm(host, name: str, info: dict | None) -> str:
    if info is None:
        raise NotFound(f"no VM named {name} on {host.name}")
    disks = "".join(f'<tr><td>{e(d["name"])}</td><td>{e(d["format"])}</td>'
                    f'<td class="num">{e(format_size(d["virtual_size"] or 0))}</td>'
                    f'<td class="small muted">{e(d["path"])}</td></tr>' for d in info["disks"])
    note = ""
    for rel in host.store.relationships():
        if (rel.test or {}).get("vm") == name:
            note = f'<p>Test failover of {_vm_link(rel.vm)}: stop it from that VM\'s page.</p>'
    return (_stamp() + f'<div class="card stack"><h2>Not replicated</h2>{note}'
            + _kv([("power", _power(info["state"])), ("memory", e(f'{info["memory_mb"]} MB')),
                   ("guest", e(info.get("guest") or "-"))])
            + '</div><div class="card"><h2>Disks</h2><table><thead><tr><th>Disk</th>'
              f'<th>Format</th><th>Size</th><th>Path</th></tr></thead><tbody>{disks}</tbody>'
              f'</table></div><div class="card"><h2>Events</h2>{_events_table(host, name)}</div>')


def _vm_page(host, session, name: str) -> Response:
    flashes = [f for f in session.get("flash", []) if f["vm"] == name]
    session["flash"] = [f for f in session.get("flash", []) if f["vm"] != name]
    flash_html = ""
    for f in flashes:
        hint = f'<div class="hint">{e(f["hint"])}</div>' if f.get("hint") else ""
        flash_html += (f'<div class="flash {e(f["kind"])}" id="result" data-kind="{e(f["kind"])}">'
                       f'<strong>{e(f["title"])}</strong><div>{e(f["text"])}</div>{hint}</div>')
    rel = host.store.relationship(name)
    role = f'<span class="pill role">{e(rel.role)}</span>' if rel else ""
    live = _vm_live(host, name, session)
    body = (f'<p class="small"><a href="/">&larr; all VMs</a></p>'
            f'<h1>{e(name)} {role}</h1>{flash_html}'
            f'<div id="live" data-src="/live/vm/{quote(name, safe="")}">{live}</div>')
    return _page(f"vmreplica: {name} on {host.name}", body, host=host, session=session)


# -- actions --------------------------------------------------------------------------------------

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
        r = api.failover(host, vm, {"action": "prepare", "shutdown": True})
        return "Prepared for planned failover", (
            f"final cycle {r['final_cycle']} acknowledged ({format_size(r['raw_bytes'])} "
            f"shipped); next: {r['next']}")
    if action == "cancel-prepare":
        api.failover(host, vm, {"action": "cancel"})
        return "Planned failover cancelled", f"replication of {vm} to {peer} goes on"
    if action == "test":
        r = api.failover(host, vm, {"action": "test", "point": point or "latest"})
        return "Test failover started", (f"test failover started: {r['test_vm']} runs from "
                                         f"point {r['point']} (started in {r['seconds']:.2f} s, "
                                         f"network {r['network']}); replication goes on")
    if action == "stop-test":
        r = api.failover(host, vm, {"action": "stop-test"})
        return "Test failover stopped", f"test failover stopped: {r['stopped']} and its files deleted"
    if action in ("failover", "force-failover"):
        chosen = None if point in (None, "", "latest") else point
        r = api.failover(host, vm, {"action": "start", "point": chosen,
                                    "force": action == "force-failover"})
        kind = "planned" if r.get("planned") else "unplanned"
        return f"Failed over ({kind})", (f"{vm} runs on {host.name} from point {r['point']} "
                                         f"(state {r['state']}); next: {r['next']}")
    if action == "complete":
        r = api.failover(host, vm, {"action": "complete"})
        return "Failover completed", f"{vm} is failed over (epoch {r['epoch']}); next: {r['next']}"
    if action == "cancel":
        r = api.failover(host, vm, {"action": "cancel"})
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
    return _page(f"vmreplica: confirm {act['label']}", (
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


def _action(host, sessions, req, name: str) -> Response:
    session = sessions.get(req.headers.get("Cookie"))
    if session is None:
        return _login_needed()
    form = read_form(req)
    if not sessions.csrf_ok(session, form.get("csrf")):
        return _error_page(host, session, "Refused",
                           "This action's form has no valid security (CSRF) token.",
                           "Reload the VM's page and try again.", status=403)
    rel = host.store.relationship(name)
    if rel is None:
        return _error_page(host, session, "Not replicated",
                           f"{name} is not replicated on {host.name}.", status=404)
    action = form.get("action", "")
    act = next((a for a in _actions(host, rel) if a["name"] == action), None)
    if act is None:
        return _error_page(host, session, "Not available",
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


# -- routes -----------------------------------------------------------------------------------------

def register(r, host, sessions) -> None:
    def guarded(fn, fragment: bool = False):
        def route(req):
            session = sessions.get(req.headers.get("Cookie"))
            if session is None:
                return _login_needed() if not fragment else Response("login needed", 401)
            try:
                return fn(req, session)
            except VmreplicaError as err:
                status = 404 if isinstance(err, NotFound) else 400
                if fragment:
                    return Response(f'<div class="flash error">{e(err.message)}</div>', status)
                return _error_page(host, session, "Error", err.message, err.hint, status=status)
            except Exception:  # noqa: BLE001
                log.exception("dashboard page %s failed", req.path)
                if fragment:
                    return Response("internal error", 500)
                return _error_page(host, session, "Internal error",
                                   "This page could not be made; the daemon's log has the "
                                   "details.", status=500)
        return route

    r.add("GET", "/", guarded(lambda req, s: _index(host, s)))
    r.add("GET", "/live/index", guarded(lambda req, s: _fragment(_index_live(host)), True))
    r.add("GET", "/vm/{name}", guarded(lambda req, s: _vm_page(host, s, req.params["name"])))
    r.add("GET", "/live/vm/{name}",
          guarded(lambda req, s: _fragment(_vm_live(host, req.params["name"], s)), True))

    @r.route("POST", "/vm/{name}/action")
    def action(req):
        try:
            return _action(host, sessions, req, req.params["name"])
        except VmreplicaError as err:
            return _error_page(host, sessions.get(req.headers.get("Cookie")), "Error",
                               err.message, err.hint)
        except Exception:  # noqa: BLE001
            log.exception("dashboard action on %s failed", req.params.get("name"))
            return _error_page(host, None, "Internal error",
                               "The action could not be run; the daemon's log has the details.",
                               status=500)
