"""Dashboard pages (filled in by the dashboard work: VM list, VM page, actions)."""

from __future__ import annotations

import html

from ..transport.http import Response


def message(text: str) -> str:
    return (f"<!doctype html><meta charset=utf-8><title>vmreplica</title>"
            f"<p>{html.escape(text)}</p>")


def register(r, host, sessions) -> None:
    @r.route("GET", "/")
    def index(req):
        session = sessions.get(req.headers.get("Cookie"))
        if session is None:
            return Response(message("Log in with the link `vmreplica dashboard` prints."),
                            status=401)
        return Response(message(f"vmreplica on {host.name}"))
