"""The dashboard's page shell and the HTML helpers every page uses: escaping (`e`: everything
shown is escaped), the page frame with its security headers (a fresh CSP nonce per page),
the standalone message, login and error pages, the live fragments' response, and the
small renderers of times, sizes, health, power, tags and a running operation.
"""

from __future__ import annotations

import html
import secrets
import time
from urllib.parse import quote

from ..domain.units import format_duration, format_size
from ..transport.http import Response
from . import assets


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


def page(title: str, body: str, *, host=None, session: dict | None = None,
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


def fragment(html_text: str) -> Response:
    return Response(html_text, headers={"Cache-Control": "no-store",
                                        "X-Content-Type-Options": "nosniff"})


def login_needed() -> Response:
    return page("vmreplica: log in", (
        '<div class="card"><h1>Log in needed</h1>'
        '<p>This dashboard needs a session. On the host, run '
        '<code>vmreplica dashboard</code> and open the one-time address it prints '
        '(valid once, for 10 minutes).</p></div>'), status=401, script=False)


def error_page(host, session, title: str, text: str, hint: str | None = None,
               status: int = 400) -> Response:
    hint_html = f'<div class="hint">{e(hint)}</div>' if hint else ""
    return page(f"vmreplica: {title}", (
        f'<div class="flash error"><strong>{e(title)}</strong><div>{e(text)}</div>'
        f'{hint_html}</div><p><a href="/">&larr; all VMs</a></p>'),
        host=host, session=session, status=status, script=False)


# -- small renderers ---------------------------------------------------------------------------

def when(ts) -> str:
    if not ts:
        return '<span class="muted">never</span>'
    full = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f'<span title="{e(full)}">{e(ago(ts))}</span>'


def ago(ts) -> str:
    if not ts:
        return "never"
    return format_duration(max(0.0, time.time() - ts)) + " ago"


def clock(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def size(n) -> str:
    return "-" if n is None else format_size(n)


def health_pill(level: str, reasons: list[str]) -> str:
    tip = "; ".join(reasons) or "all is well"
    return f'<span class="pill {e(level)} health" title="{e(tip)}">{e(level)}</span>'


def reason_list(level: str, reasons: list[str]) -> str:
    if not reasons:
        return ""
    items = "".join(f'<li class="{e(level)}">{e(r)}</li>' for r in reasons)
    return f'<ul class="reasons">{items}</ul>'


def power_pill(state: str | None) -> str:
    if not state:
        return '<span class="muted">-</span>'
    cls = "running" if state == "running" else "off"
    return f'<span class="pill {cls}">{e(state)}</span>'


def tag_pills(tags) -> str:
    return "".join(f' <span class="tag">{e(t)}</span>' for t in tags or [])


def running(op: dict | None) -> str:
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


def vm_link(name: str) -> str:
    return f'<a href="/vm/{quote(name, safe="")}">{e(name)}</a>'


def kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def stamp() -> str:
    return f'<p class="stamp">as of {e(time.strftime("%H:%M:%S"))} &middot; refreshes every 5 s</p>'
