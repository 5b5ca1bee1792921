"""Routes of the web listener. Pages are rendered on the server (no build step, no
external assets); every page and action needs a session, /metrics does not (as usual
for a Prometheus target). The pages are in `pages`, what the operator can do from them in
`actions`, the page shell they share in `layout`; a page's error is an error page
(message and hint, never a stack trace).
"""

from __future__ import annotations

import logging

from ..errors import NotFound, VmreplicaError
from ..service import metrics
from ..transport.http import Response, Router
from . import actions, auth, pages
from .layout import e, error_page, fragment, login_needed, message

log = logging.getLogger("vmreplica.web")


def routes(host, sessions: auth.Sessions) -> Router:
    r = Router()

    @r.route("GET", "/metrics")
    def metrics_route(req):
        return Response(metrics.render(host), content_type=metrics.CONTENT_TYPE)

    @r.route("GET", "/login")
    def login(req):
        session = sessions.login(req.query.get("token", ""))
        if session is None:
            return Response(message("This login link is not valid (it is single use and "
                                    "lasts 10 minutes). Run `vmreplica dashboard` for a "
                                    "new one."), status=403)
        return Response.redirect("/", {"Set-Cookie": sessions.set_cookie(session)})

    @r.route("POST", "/logout")
    def logout(req):
        session = sessions.get(req.headers.get("Cookie"))
        form = actions.read_form(req)
        if session is not None and not sessions.csrf_ok(session, form.get("csrf")):
            return Response(message("Refused: this request did not come from the "
                                    "dashboard (CSRF token missing)."), status=403)
        sessions.logout(req.headers.get("Cookie"))
        return Response(message("Logged out."))

    def guarded(fn, is_fragment: bool = False):
        def route(req):
            session = sessions.get(req.headers.get("Cookie"))
            if session is None:
                return login_needed() if not is_fragment else Response("login needed", 401)
            try:
                return fn(req, session)
            except VmreplicaError as err:
                status = 404 if isinstance(err, NotFound) else 400
                if is_fragment:
                    return Response(f'<div class="flash error">{e(err.message)}</div>', status)
                return error_page(host, session, "Error", err.message, err.hint, status=status)
            except Exception:  # noqa: BLE001
                log.exception("dashboard page %s failed", req.path)
                if is_fragment:
                    return Response("internal error", 500)
                return error_page(host, session, "Internal error",
                                  "This page could not be made; the daemon's log has the "
                                  "details.", status=500)
        return route

    r.add("GET", "/", guarded(lambda req, s: pages.index(host, s)))
    r.add("GET", "/live/index", guarded(lambda req, s: fragment(pages.index_live(host)), True))
    r.add("GET", "/vm/{name}", guarded(lambda req, s: pages.vm_page(host, s, req.params["name"])))
    r.add("GET", "/live/vm/{name}",
          guarded(lambda req, s: fragment(pages.vm_live(host, req.params["name"], s)), True))

    @r.route("POST", "/vm/{name}/action")
    def action(req):
        try:
            return actions.handle(host, sessions, req, req.params["name"])
        except VmreplicaError as err:
            return error_page(host, sessions.get(req.headers.get("Cookie")), "Error",
                              err.message, err.hint)
        except Exception:  # noqa: BLE001
            log.exception("dashboard action on %s failed", req.params.get("name"))
            return error_page(host, None, "Internal error",
                              "The action could not be run; the daemon's log has the details.",
                              status=500)

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
