"""Client side of host-to-host traffic: HTTPS with mutual TLS against a pinned certificate.

Every failure becomes one typed error that names the peer and says what to do:
unreachable (refused, timed out, cut), not trusted (certificate not the pinned one),
or the peer's own JSON error (refused, conflict, integrity...).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .. import errors
from . import tls


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection that offers a TLS session to resume (tls.Sessions)."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext, timeout: float,
                 session: ssl.SSLSession | None = None):
        super().__init__(host, port, context=context, timeout=timeout)
        self._tls = context
        self._session = session

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host,
                                          session=self._session)


class PeerClient:
    def __init__(self, host: str, port: int, cert: Path | None, key: Path | None,
                 pinned_pem: str | None, expect_fingerprint: str | None,
                 peer_name: str | None = None, timeout: float = 60.0):
        self.host, self.port = host, port
        self.cert, self.key = cert, key
        self.pinned_pem = pinned_pem
        self.expect_fingerprint = expect_fingerprint
        self.peer_name = peer_name
        self.timeout = timeout
        self.server_fingerprint: str | None = None
        self.server_name: str | None = None     # the common name of its certificate
        self._ahead: threading.Thread | None = None
        self._ahead_result: tuple = ()

    AHEAD_MAX_AGE = 30.0   # an opened connection kept longer may meet the peer's idle timeout

    def connect_ahead(self) -> None:
        """Open the next request's connection now, on a thread of its own, so the TCP and
        TLS handshakes overlap the caller's own work (a cycle's freeze). Errors are
        raised by the request, as if it had connected itself."""
        def run():
            try:
                self._ahead_result = ("ok", self._connect(), time.monotonic())
            except Exception as e:  # noqa: BLE001 — raised by the request that uses it
                self._ahead_result = ("error", e, time.monotonic())

        self._ahead = threading.Thread(target=run, name="connect-ahead", daemon=True)
        self._ahead.start()

    def _take_ahead(self):
        """The connection connect_ahead() opened (None if there is none, or it is old)."""
        t, self._ahead = self._ahead, None
        if t is None:
            return None
        t.join()
        kind, value, at = self._ahead_result
        self._ahead_result = ()
        if kind == "error":
            raise value
        if time.monotonic() - at > self.AHEAD_MAX_AGE:
            value.close()
            return None
        return value

    def discard(self) -> None:
        """Close a connection opened ahead and never used."""
        try:
            conn = self._take_ahead()
        except Exception:  # noqa: BLE001 — nothing was sent on it
            return
        if conn is not None:
            conn.close()

    @property
    def where(self) -> str:
        label = f"{self.host}:{self.port}"
        return f"{self.peer_name} ({label})" if self.peer_name else label

    def _session_key(self, ctx: ssl.SSLContext) -> tuple:
        return (ctx, self.host, self.port, self.expect_fingerprint)

    def _connect(self) -> _Connection:
        # A pinned peer: its context is built once and its last session offered again.
        # Pairing (nothing pinned yet) always makes a full handshake of its own.
        if self.pinned_pem:
            ctx = tls.cached_client_context(self.cert, self.key, [self.pinned_pem])
            session = tls.SESSIONS.get(self._session_key(ctx))
        else:
            ctx, session = tls.client_context(self.cert, self.key, None), None
        conn = _Connection(self.host, self.port, context=ctx, timeout=self.timeout,
                           session=session)
        try:
            try:
                conn.connect()
            except ValueError:          # a session this context cannot offer: not again
                conn.close()
                tls.SESSIONS.forget(self._session_key(ctx))
                conn = _Connection(self.host, self.port, context=ctx, timeout=self.timeout)
                conn.connect()
        except ssl.SSLCertVerificationError as e:
            conn.close()
            raise errors.NotTrusted(
                f"{self.where} presented a certificate that is not the one pinned for it ({e.verify_message})",
                hint="if the peer was re-initialised, pair again: `vmreplica trust token` there, "
                     "`vmreplica trust pair HOST:PORT TOKEN` here") from None
        except ssl.SSLError as e:
            conn.close()
            raise errors.NotTrusted(
                f"TLS with {self.where} failed: {e.reason or e}",
                hint="the peer does not trust this host: pair the hosts with "
                     "`vmreplica trust token` / `vmreplica trust pair`") from None
        except (ConnectionRefusedError, socket.gaierror, TimeoutError, OSError) as e:
            conn.close()
            reason = "connection refused" if isinstance(e, ConnectionRefusedError) else (
                "timed out" if isinstance(e, TimeoutError) else str(e))
            raise errors.Unreachable(
                f"cannot reach {self.where}: {reason}",
                hint="check the address and that `vmreplica serve` runs there") from None
        der = conn.sock.getpeercert(binary_form=True)
        self.server_fingerprint = tls.fingerprint_der(der) if der else None
        if self.expect_fingerprint and self.server_fingerprint != self.expect_fingerprint:
            conn.close()
            self.server_name = tls.name_of_der(der)
            # Both in full, the differing characters marked: cut short, two fingerprints
            # that differ in one character look identical.
            shown, _ = tls.compare_fingerprints(str(self.server_fingerprint),
                                                self.expect_fingerprint,
                                                ("presented", "expected"))
            err = errors.NotTrusted(
                f"{self.where} presented a certificate that does not match the one expected "
                f"(the characters that differ are marked):\n{shown}",
                hint="check the address; if the peer was re-initialised, pair again: "
                     "`vmreplica trust token` there, `vmreplica trust pair HOST:PORT TOKEN` here")
            err.presented, err.expected = self.server_fingerprint, self.expect_fingerprint
            raise err
        return conn

    def request(self, method: str, path: str, body: dict | Iterable[bytes] | None = None,
                timeout: float | None = None) -> dict:
        conn = self._take_ahead() or self._connect()
        if timeout is not None:
            conn.sock.settimeout(timeout)
        try:
            headers = {"Connection": "close"}
            sent_error: Exception | None = None
            try:
                if body is None:
                    conn.request(method, path, headers=headers)
                elif isinstance(body, dict):
                    data = json.dumps(body).encode()
                    headers["Content-Type"] = "application/json"
                    conn.request(method, path, body=data, headers=headers)
                else:
                    headers["Content-Type"] = "application/octet-stream"
                    conn.request(method, path, body=body, headers=headers, encode_chunked=True)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as e:
                sent_error = e  # the peer may have answered early (refusal): read it below
            try:
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError) as e:
                cause = sent_error or e
                raise errors.Unreachable(
                    f"connection to {self.where} was cut: {cause}",
                    hint="the changes are kept and sent again (a cycle or a resync runs "
                         "again); the replica never exposes part of one") from None
            if self.pinned_pem and isinstance(conn.sock, ssl.SSLSocket):
                # (a TLS 1.3 ticket arrives after the handshake: read with the answer)
                tls.SESSIONS.put(self._session_key(conn.sock.context), conn.sock.session)
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise errors.TransportError(f"{self.where} answered with something that is not JSON "
                                        f"(HTTP {resp.status})") from None
        if resp.status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if err:
                raise errors.from_json(err)
            raise errors.TransportError(f"{self.where} answered HTTP {resp.status}")
        return data
