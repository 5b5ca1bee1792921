"""Dashboard login: `vmreplica dashboard` asks the daemon (over its unix socket, so only
someone with access to the host's home can) for a one-time token, valid 10 minutes; the
browser trades it for a session cookie (12 hours, HttpOnly, Secure, SameSite=Strict).
Actions also need the session's CSRF token."""

from __future__ import annotations

import hmac
import secrets
import threading
import time

TOKEN_TTL = 600
SESSION_TTL = 12 * 3600
COOKIE = "vmr_session"


class Sessions:
    def __init__(self, cookie: str = COOKIE):
        # Browsers do not tell cookies apart by port: two hosts on one machine (the lab,
        # the demo) need a cookie name each, or logging into one logs out of the other.
        self.cookie = cookie
        self._tokens: dict[str, float] = {}
        self._sessions: dict[str, dict] = {}
        self._guard = threading.Lock()

    def new_token(self) -> str:
        token = secrets.token_urlsafe(24)
        with self._guard:
            self._tokens[token] = time.time() + TOKEN_TTL
        return token

    def login(self, token: str) -> dict | None:
        """Trade a token (once) for a session: {id, csrf, expires}."""
        now = time.time()
        with self._guard:
            expires = self._tokens.pop(token, None)
            if expires is None or expires < now:
                return None
            sid = secrets.token_urlsafe(32)
            session = {"id": sid, "csrf": secrets.token_urlsafe(16), "expires": now + SESSION_TTL}
            self._sessions[sid] = session
            return session

    def get(self, cookie_header: str | None) -> dict | None:
        sid = _cookie(cookie_header, self.cookie)
        if not sid:
            return None
        with self._guard:
            s = self._sessions.get(sid)
            if s is None or s["expires"] < time.time():
                self._sessions.pop(sid, None)
                return None
            return s

    def logout(self, cookie_header: str | None) -> None:
        sid = _cookie(cookie_header, self.cookie)
        with self._guard:
            self._sessions.pop(sid or "", None)

    def set_cookie(self, session: dict) -> str:
        return (f"{self.cookie}={session['id']}; Path=/; Max-Age={SESSION_TTL}; HttpOnly; "
                "Secure; SameSite=Strict")

    @staticmethod
    def csrf_ok(session: dict, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(session["csrf"], value)


def _cookie(header: str | None, name: str) -> str | None:
    for part in (header or "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None
