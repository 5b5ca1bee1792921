"""Dashboard pages, rendered on the server, read only: the VM list (`/`) with the cluster
section, a VM's page (`/vm/NAME`) with its status, figures, recovery points, cycle chart,
events and the forms of its actions (`actions`), and the live fragments each page
refreshes itself from (`/live/index`, `/live/vm/NAME`).
"""

from __future__ import annotations

from urllib.parse import quote

from ..domain.relationship import Relationship
from ..domain.units import format_duration, format_size
from ..errors import NotFound, VmreplicaError
from ..service import monitor, operations, vms
from ..service.api.common import recovery_points
from ..transport.http import Response
from .actions import actions_html
from .layout import (
    ago,
    clock,
    e,
    health_pill,
    kv,
    page,
    power_pill,
    reason_list,
    running,
    size,
    stamp,
    tag_pills,
    vm_link,
    when,
)

CHART_CYCLES = 40
EVENTS_SHOWN = 40


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
        rows.append(f'<tr data-vm="{e(v["vm"])}"><td><strong>{vm_link(v["vm"])}</strong></td>'
                    f'<td>{e(", ".join(v["running_on"]) or "-")}</td>{cells}'
                    f'<td>{"yes" if v["in_sync"] else "no"}</td><td>{fails}</td></tr>')
    ths = "".join(f"<th>{e(n)}</th>" for n in nodes)
    return (f'<div class="card stack"><h2>Cluster {head} {quorum}</h2>'
            f'<table class="vms compact" id="cluster-vms"><thead><tr><th>VM</th><th>Runs on</th>'
            f'{ths}<th>In sync</th><th>Failures</th></tr></thead><tbody>{"".join(rows)}'
            f'</tbody></table></div>')


# -- index -------------------------------------------------------------------------------------------

def index_live(host) -> str:
    views = monitor.status(host)
    try:
        all_vms = vms.list_all(host)
        vm_error = None
    except VmreplicaError as err:
        all_vms, vm_error = [], err.message
    power = {v["name"]: v["state"] for v in all_vms}
    tests = {v["test_vm"]: v["vm"] for v in views if v.get("test_vm")}

    out = [stamp(), f'<div class="cluster" id="cluster">{cluster_section(host)}</div>']
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
            reasons = reason_list(v["health"], v["reasons"]) or \
                '<span class="small muted">all is well</span>'
            out.append(
                f'<tr class="rel health-{e(v["health"])}" data-vm="{e(v["vm"])}" '
                f'data-health="{e(v["health"])}">'
                f'<td>{health_pill(v["health"], v["reasons"])}</td>'
                f'<td><strong>{vm_link(v["vm"])}</strong>{tag_pills(v.get("tags"))}</td>'
                f'<td>{power_pill(power.get(v["vm"]))}</td>'
                f'<td><span class="pill role">{e(v["role"])}</span></td>'
                f'<td>{e(v["peer"])}</td><td class="state">{e(v["state"])}'
                f'{running(v.get("activity"))}</td>'
                f'<td>{e(v["mode"])}</td><td>{e(v["mode_label"])}</td>'
                f'<td class="nowrap">{when(v["last_cycle_at"])}</td>'
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
                note = f'test failover of {vm_link(tests[v["name"]])}'
            out.append(
                f'<tr data-vm="{e(v["name"])}"><td><strong>{vm_link(v["name"])}</strong>'
                f'{tag_pills(v.get("tags"))}</td>'
                f'<td>{power_pill(v["state"])}</td>'
                f'<td class="num">{e(v.get("memory_mb"))} MB</td>'
                f'<td class="nowrap">{len(disks)} &middot; {e(format_size(total))}</td>'
                f'<td>{e(v.get("guest") or "-")}</td><td>{note}</td></tr>')
        out.append("</tbody></table>")
    out.append("</div>")
    return "".join(out)


def index(host, session) -> Response:
    body = f'<div id="live" data-src="/live/index">{index_live(host)}</div>'
    return page(f"vmreplica: {host.name}", body, host=host, session=session,
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
            tip = f"cycle {c.cycle} failed at {clock(c.started_at)}: {c.error or ''}"
        else:
            h = max(1.5, plot_h * min(raw, scale) / scale)
            cls = f"bar {c.kind}" + (" clipped" if raw > scale else "")
            tip = (f"cycle {c.cycle} ({c.kind}) at {clock(c.started_at)}: "
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


def _hours_chart(hist: dict) -> str:
    """Bytes changed per hour over measure's history (service.monitor.measure_vm): the
    hours kept in full and those rolled up alike (README, "What is kept")."""
    hours = hist["per_hour"]
    if not hours:
        return '<p class="empty">No cycle in these hours.</p>'
    W, H, left, top, bottom = 1160, 120, 64, 10, 22
    plot_h = H - top - bottom
    n = int(hist["hours"]) + 1
    first = float(hist["since"])
    scale = max(int(h["bytes_raw"]) for h in hours) or 1
    slot = (W - left - 8) / n
    bw = max(2.0, slot * 0.8)
    base = top + plot_h
    parts = [(f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" '
              f'aria-label="bytes changed per hour, last {n - 1} hours">'),
             f'<line class="axis" x1="{left}" x2="{W - 4}" y1="{base}" y2="{base}"/>',
             (f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">'
              f'{e(format_size(scale))}</text>'),
             f'<text x="{left - 6}" y="{base + 4}" text-anchor="end">0</text>']
    for h in hours:
        i = round((float(h["hour"]) - first) / 3600)
        if not 0 <= i < n:
            continue
        x = left + 4 + i * slot
        height = max(1.5, plot_h * int(h["bytes_raw"]) / scale)
        cls = "hour" + (" failures" if h["failures"] else "")
        tip = (f"{clock(h['hour'])}: {h['cycles']} cycles, {h['failures']} failed, "
               f"{h['late']} late, {format_size(h['bytes_raw'])} changed, "
               f"{format_size(h['bytes_sent'])} sent")
        parts.append(f'<rect class="{cls}" data-hour="{int(h["hour"])}" '
                     f'data-bytes="{h["bytes_raw"]}" x="{x:.1f}" y="{base - height:.1f}" '
                     f'width="{bw:.1f}" height="{height:.1f}"><title>{e(tip)}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


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
                    f'<td class="nowrap">{e(clock(p.get("time")))} '
                    f'<span class="small muted">({e(ago(p.get("time")))})</span></td>'
                    f'<td>{e(p.get("kind"))}</td><td class="num">{e(size(p.get("size")))}</td></tr>')
    return ('<table id="points"><thead><tr><th>Point</th><th>Host</th><th>Time</th><th>Kind</th>'
            f'<th>Size</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _events_table(host, vm: str) -> str:
    events = host.store.events(vm, limit=EVENTS_SHOWN)[::-1]
    if not events:
        return '<p class="empty">No events.</p>'
    rows = "".join(f'<tr><td class="nowrap small">{e(clock(ev["ts"]))}</td>'
                   f'<td class="kind small">{e(ev["kind"])}</td><td>{e(ev["message"])}</td></tr>'
                   for ev in events)
    return (f'<div class="scroll"><table class="events" id="events"><thead><tr><th>Time</th>'
            f'<th>Kind</th><th>Event</th></tr></thead><tbody>{rows}</tbody></table></div>')


def vm_live(host, name: str, session: dict) -> str:
    rel = host.store.relationship(name)
    try:
        info = vms.show(host, name)
    except NotFound:
        info = None
    if rel is None:
        return _plain_vm(host, name, info)
    v = monitor.view(host, rel)
    try:
        pts = recovery_points(host, name)
    except VmreplicaError as err:
        pts = [{"id": None, "host": host.name, "error": err.message}]

    status_rows = [
        ("health", (health_pill(v["health"], v["reasons"])
                    + reason_list(v["health"], v["reasons"]))),
        ("role / peer", f'{e(v["role"])} &middot; {e(v["peer"])}'),
        ("state", (f'<span class="state">{e(v["state"])}</span>'
                   f'{running(v.get("activity"))}')),
        ("power", power_pill(info["state"] if info else None)),
        ("mode / frequency", e(v["mode"]) + " &middot; " +
         (f'every {e(v["frequency"])}' if v["mode"] == "periodic" else e(v["mode_label"]))),
        ("last sync", when(v["last_cycle_at"])),
        ("lag", e(format_duration(v["lag_seconds"]))),
        ("cycle / epoch", f'{e(v["cycle"])} &middot; epoch {e(v["epoch"])}'),
        ("disks", e(", ".join(v["disks"]))),
    ]
    if v.get("test_vm"):
        status_rows.append(("test failover", f'{vm_link(v["test_vm"])} running'))
    if v.get("next"):
        status_rows.append(("next step", f'<code>{e(v["next"])}</code>'))
    if v.get("last_error"):
        status_rows.append(("last error", f'<span class="small">{e(v["last_error"])}</span>'))

    if rel.role == "replica":
        figures, measure_rows = "Replica", _replica_figures(host, rel)
        hours_card = ""
    else:
        figures = 'Measure <span class="small muted">(last 12 h)</span>'
        measured = monitor.measure_vm(host, name)
        measure_rows = _primary_figures(measured)
        hist = measured["history"]
        hours_card = (
            f'<div class="card stack" id="hours"><h2>Per hour <span class="small muted">'
            f'(bytes changed, last {hist["hours"]} h: {hist["cycles"]} cycles, '
            f'{hist["failures"]} failed, {hist["late"]} late)</span></h2>'
            f'{_hours_chart(hist)}</div>')
    return "".join([
        stamp(),
        (f'<div class="card stack" id="actions-card"><h2>Actions</h2>'
         f'{actions_html(host, rel, session, pts)}</div>'),
        '<div class="grid stack">',
        f'<div class="card" id="status"><h2>Status</h2>{kv(status_rows)}</div>',
        f'<div class="card" id="measure"><h2>{figures}</h2>{kv(measure_rows)}</div>',
        '</div>',
        (f'<div class="card stack" id="chart"><h2>Cycle history '
         f'<span class="small muted">(bytes changed per cycle, last {CHART_CYCLES})</span></h2>'
         f'{_chart(host, name, rel)}</div>'),
        hours_card,
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
                                f'{when(rel.last_applied_at)}')),
        ("newest state from", e(clock(rel.last_freeze_at))),
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
            note = f'<p>Test failover of {vm_link(rel.vm)}: stop it from that VM\'s page.</p>'
    return (stamp() + f'<div class="card stack"><h2>Not replicated</h2>{note}'
            + kv([("power", power_pill(info["state"])), ("memory", e(f'{info["memory_mb"]} MB')),
                  ("guest", e(info.get("guest") or "-"))])
            + '</div><div class="card"><h2>Disks</h2><table><thead><tr><th>Disk</th>'
              f'<th>Format</th><th>Size</th><th>Path</th></tr></thead><tbody>{disks}</tbody>'
              f'</table></div><div class="card"><h2>Events</h2>{_events_table(host, name)}</div>')


def vm_page(host, session, name: str) -> Response:
    flashes = [f for f in session.get("flash", []) if f["vm"] == name]
    session["flash"] = [f for f in session.get("flash", []) if f["vm"] != name]
    flash_html = ""
    for f in flashes:
        hint = f'<div class="hint">{e(f["hint"])}</div>' if f.get("hint") else ""
        flash_html += (f'<div class="flash {e(f["kind"])}" id="result" data-kind="{e(f["kind"])}">'
                       f'<strong>{e(f["title"])}</strong><div>{e(f["text"])}</div>{hint}</div>')
    rel = host.store.relationship(name)
    role = f'<span class="pill role">{e(rel.role)}</span>' if rel else ""
    live = vm_live(host, name, session)
    body = (f'<p class="small"><a href="/">&larr; all VMs</a></p>'
            f'<h1>{e(name)} {role}</h1>{flash_html}'
            f'<div id="live" data-src="/live/vm/{quote(name, safe="")}">{live}</div>')
    return page(f"vmreplica: {name} on {host.name}", body, host=host, session=session)
