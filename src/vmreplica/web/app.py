"""Routes of the web listener. Pages are rendered on the server (no build step, no
external assets); every page and action needs a session, /metrics does not (as usual
for a Prometheus target)."""

from __future__ import annotations

from ..service import metrics
from ..transport.http import Response, Router
from . import auth, pages


def routes(host, sessions: auth.Sessions) -> Router:
    r = Router()

    @r.route("GET", "/metrics")
    def metrics_route(req):
        return Response(metrics.render(host), content_type=metrics.CONTENT_TYPE)

    @r.route("GET", "/login")
    def login(req):
        session = sessions.login(req.query.get("token", ""))
        if session is None:
            return Response(pages.message("This login link is not valid (it is single use and "
                                          "lasts 10 minutes). Run `vmreplica dashboard` for a "
                                          "new one."), status=403)
        return Response.redirect("/", {"Set-Cookie": sessions.set_cookie(session)})

    @r.route("POST", "/logout")
    def logout(req):
        session = sessions.get(req.headers.get("Cookie"))
        form = pages.read_form(req)
        if session is not None and not sessions.csrf_ok(session, form.get("csrf")):
            return Response(pages.message("Refused: this request did not come from the "
                                          "dashboard (CSRF token missing)."), status=403)
        sessions.logout(req.headers.get("Cookie"))
        return Response(pages.message("Logged out."))

    pages.register(r, host, sessions)
    return r


class Dashboard:
    """What a daemon serves on its web port, handed to it by `serve` (the service layer
    does not import this one): the routes over the host, and the login sessions the
    management API issues one-time tokens for (`vmreplica dashboard`)."""

    def __init__(self, port: str):
        # A cookie name per web port: see auth.Sessions.
        self.sessions = auth.Sessions(cookie=f"{auth.COOKIE}_{port}")

    def new_token(self) -> str:
        return self.sessions.new_token()

    def routes(self, host) -> Router:
        return routes(host, self.sessions)
