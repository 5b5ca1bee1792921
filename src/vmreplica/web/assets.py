"""The dashboard's stylesheet and script, inlined into every page (with the page's CSP
nonce): no external assets, no build step, works on a closed network."""

from __future__ import annotations

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --card:#fff;
  --green:#1a7f37; --green-bg:#dafbe1; --amber:#9a6700; --amber-bg:#fff8c5;
  --red:#cf222e; --red-bg:#ffebe9; --blue:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
  color:var(--fg); background:var(--bg); }
a { color:var(--blue); text-decoration:none; } a:hover { text-decoration:underline; }
header.top { display:flex; align-items:center; gap:16px; padding:10px 20px; background:#24292f;
  color:#fff; }
header.top .brand { font-weight:600; letter-spacing:.3px; color:#fff; }
header.top .host { font-size:16px; font-weight:600; }
header.top .addr { color:#afb8c1; font-size:12px; }
header.top .spacer { flex:1; }
header.top form { margin:0; }
header.top button { background:transparent; color:#d0d7de; border:1px solid #57606a;
  border-radius:6px; padding:3px 10px; cursor:pointer; font:inherit; font-size:12px; }
main { max-width:1280px; margin:0 auto; padding:16px 20px 40px; }
h1 { font-size:20px; margin:4px 0 12px; display:flex; align-items:center; gap:10px; }
h2 { font-size:15px; margin:0 0 8px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px;
  margin-bottom:14px; }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(380px,1fr)); gap:14px; }
.grid > .card { margin-bottom:0; }
.stack { margin-bottom:14px; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid #eaeef2; vertical-align:top; }
th { font-size:12px; font-weight:600; color:var(--muted); text-transform:uppercase;
  letter-spacing:.4px; background:#f6f8fa; border-bottom:1px solid var(--line); white-space:nowrap; }
tr:last-child td { border-bottom:none; }
table.vms td { white-space:nowrap; } table.vms td.why { white-space:normal; min-width:260px; }
table.compact { width:auto; min-width:60%; } table.compact td, table.compact th { padding-right:24px; }
th.num { text-align:right; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.nowrap { white-space:nowrap; }
table.vms tr.rel td:first-child { border-left:4px solid transparent; }
table.vms tr.health-normal td:first-child { border-left-color:var(--green); }
table.vms tr.health-warning td:first-child { border-left-color:#d4a72c; }
table.vms tr.health-critical td:first-child { border-left-color:var(--red); }
table.vms tr.health-critical { background:#fff5f5; }
table.vms tr.health-warning { background:#fffdf0; }
table.kv th, table.kv td { vertical-align:baseline; }
table.kv th { text-transform:none; letter-spacing:0; background:none; border-bottom:1px solid #eaeef2;
  width:34%; font-size:13px; color:var(--muted); font-weight:500; }
.pill { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600;
  color:#fff; white-space:nowrap; }
.pill.normal { background:#1f883d; }
.pill.warning { background:#d4a72c; color:#3b2300; }
.pill.critical { background:#d1242f; }
.tag { font-size:11px; color:#0550ae; background:#ddf4ff; border-radius:4px; padding:0 5px; margin-left:2px; }
.pill.role { background:#eaeef2; color:var(--fg); font-weight:500; }
.pill.off { background:#eaeef2; color:var(--muted); font-weight:500; }
.pill.running { background:#ddf4ff; color:#0550ae; font-weight:500; }
.reasons { margin:2px 0 0; padding:0; list-style:none; font-size:12px; }
.reasons li.critical { color:var(--red); } .reasons li.warning { color:var(--amber); }
.reasons li.normal { color:var(--muted); }
.muted { color:var(--muted); } .small { font-size:12px; }
code { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12px; background:#eff1f3;
  padding:1px 4px; border-radius:4px; }
.flash { border-radius:8px; padding:10px 14px; margin-bottom:14px; border:1px solid; }
.flash.ok { background:var(--green-bg); border-color:#4ac26b; }
.flash.error { background:var(--red-bg); border-color:#ff8182; }
.flash .hint { color:var(--muted); margin-top:2px; }
.actions { display:flex; flex-wrap:wrap; gap:8px; align-items:center; }
.actions form { margin:0; display:flex; gap:6px; align-items:center; padding:6px 8px;
  border:1px solid #eaeef2; border-radius:8px; background:#fbfcfd; }
.actions label { font-size:12px; color:var(--muted); }
button.btn { font:inherit; font-size:13px; padding:4px 12px; border-radius:6px; cursor:pointer;
  border:1px solid rgba(31,35,40,.15); background:#f6f8fa; color:var(--fg); font-weight:500; }
button.btn:hover { background:#eef1f4; }
button.btn.go { background:#1f883d; color:#fff; border-color:#1a7f37; }
button.btn.danger { background:#fff; color:var(--red); border-color:#ff8182; }
button.btn.danger:hover { background:var(--red); color:#fff; }
button.btn[disabled] { opacity:.6; cursor:progress; }
select { font:inherit; font-size:13px; padding:3px 4px; border-radius:6px; border:1px solid var(--line); }
body.busy { cursor:progress; }
.busy-note { display:none; } body.busy .busy-note { display:inline; }
.stamp { font-size:12px; color:var(--muted); margin:0 0 8px; }
.stamp.stale { color:var(--red); }
svg.chart { width:100%; height:auto; max-height:170px; display:block; }
svg.chart rect.bar { fill:#54aeff; } svg.chart rect.bar:hover { fill:#0969da; }
svg.chart rect.bar.initial, svg.chart rect.bar.resync { fill:#8250df; }
svg.chart rect.bar.clipped { fill:#a475f9; }
svg.chart rect.bar.failed { fill:#cf222e; }
svg.chart rect.hour { fill:#54aeff; } svg.chart rect.hour.failures { fill:#bf8700; }
svg.chart line.axis { stroke:#d0d7de; stroke-width:1; }
svg.chart line.grid { stroke:#eaeef2; stroke-width:1; }
svg.chart text { font-size:11px; fill:#656d76; font-family:system-ui,sans-serif; }
.legend { font-size:12px; color:var(--muted); display:flex; gap:14px; margin-top:4px; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px;
  vertical-align:-1px; }
.legend i.delta { background:#54aeff; } .legend i.initial { background:#8250df; }
.legend i.failed { background:#cf222e; }
.events td.kind { white-space:nowrap; color:var(--muted); }
.scroll { max-height:340px; overflow:auto; }
.cluster:empty { display:none; }
.empty { color:var(--muted); padding:8px 2px; }
.confirm { max-width:640px; }
.confirm form { display:flex; gap:10px; align-items:center; margin-top:12px; }
"""

# Confirmation before every action (the server asks again when JS is off: a form posted
# without `confirmed=1` gets a confirmation page), and a refresh of the live part of the
# page every 5 s (skipped while an action runs or a field of it has the focus).
JS = """
(function () {
  var busy = false, inflight = false;
  document.addEventListener('submit', function (ev) {
    var f = ev.target, msg = f.getAttribute('data-confirm');
    if (!msg) return;
    var sel = f.querySelector('select[name=point]');
    if (sel) msg = msg.replace('{point}', sel.options[sel.selectedIndex].text);
    if (!window.confirm(msg)) { ev.preventDefault(); return; }
    var c = f.querySelector('input[name=confirmed]');
    if (c) c.value = '1';
    busy = true;
    document.body.classList.add('busy');
    var b = f.querySelector('button');
    if (b) { b.disabled = true; b.textContent = b.textContent + ' \\u2026'; }
  });
  var live = document.getElementById('live');
  if (!live || !live.getAttribute('data-src')) return;
  setInterval(function () {
    if (busy || inflight || document.hidden) return;
    var a = document.activeElement;
    if (a && live.contains(a) && /^(SELECT|INPUT|BUTTON)$/.test(a.tagName)) return;
    inflight = true;
    fetch(live.getAttribute('data-src'), {credentials: 'same-origin', cache: 'no-store'})
      .then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (t) { if (t !== null && !busy && t !== live.innerHTML) live.innerHTML = t; })
      .catch(function () {
        var s = live.querySelector('.stamp');
        if (s) { s.classList.add('stale'); s.textContent = 'cannot reach the daemon; retrying'; }
      })
      .then(function () { inflight = false; });
  }, 5000);
})();
"""
