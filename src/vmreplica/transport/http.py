"""Small JSON-over-HTTP/1.1 server plumbing, shared by the management API (unix socket)
and the replication API (TCP + mutual TLS). Routes map (method, path pattern) to a
function ``fn(request) -> dict | Iterator[bytes]``; errors become JSON with a status.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import errors

log = logging.getLogger("vmreplica.http")

_STATUS = {
    "usage": 400, "not_found": 404, "conflict": 409, "refused": 403, "not_trusted": 403,
    "superseded": 409,
    "integrity": 422, "unreachable": 502, "transport": 502,
}


class Request:
    def __init__(self, handler: Handler, params: dict):
        self.handler = handler
        self.method = handler.command
        parts = urlsplit(handler.path)
        self.path = parts.path
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.params = params
        self.headers = handler.headers
        self.peer_fingerprint: str | None = getattr(handler, "peer_fingerprint", None)
        self._reader: BodyReader | None = None
        self.answered = False

    def answer_now(self, data: dict) -> None:
        """Send the JSON answer ``data`` now and let the route go on working (the replica
        acknowledges a staged cycle, then applies it). What the route returns is then
        not sent, and an error it raises afterwards is logged: the client has its
        answer. The connection closes when the route ends."""
        h = self.handler
        if self._reader is not None and not self._reader.done:
            h._drain(self)                   # (the chunked body's last, empty chunk)
        h.close_connection = True
        self.answered = True                 # (once: a failed send is not sent again)
        h._send_json(200, data)
        h.wfile.flush()

    def body(self) -> BodyReader:
        """The request body as a stream with ``read(n)`` (Content-Length or chunked)."""
        if self._reader is None:
            self._reader = BodyReader(self.handler.rfile, self.headers)
        return self._reader

    def chunks(self) -> Iterator[bytes]:
        body = self.body()
        while True:
            piece = body.read(1 << 20)
            if not piece:
                return
            yield piece

    def json(self) -> dict:
        body = b"".join(self.chunks())
        if not body:
            return {}
        try:
            data = json.loads(body)
        except ValueError as e:
            raise errors.UsageError(f"request body is not JSON: {e}") from None
        except RecursionError:
            raise errors.UsageError("request body is not JSON: nested too deep") from None
        if not isinstance(data, dict):
            raise errors.UsageError("request body must be a JSON object")
        return data


class Response:
    """A route's answer that is not JSON: a page, metrics, a redirect with a cookie."""

    def __init__(self, body: bytes | str = b"", status: int = 200,
                 content_type: str = "text/html; charset=utf-8",
                 headers: dict[str, str] | None = None):
        self.body = body.encode() if isinstance(body, str) else body
        self.status = status
        self.content_type = content_type
        self.headers = headers or {}

    @classmethod
    def redirect(cls, location: str, headers: dict[str, str] | None = None) -> Response:
        return cls(b"", 303, headers={"Location": location, **(headers or {})})


class BodyReader:
    """``read(n)`` over a request body; a cut connection is a ``TransportError``."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = headers.get("Transfer-Encoding", "").lower() == "chunked"
        length = (headers.get("Content-Length") or "0").strip()
        if not self.chunked and not (length.isascii() and length.isdigit()):
            # (int() took "-1", and read(-1) waited for the client to close the connection)
            self.done = True
            raise errors.UsageError(f"malformed Content-Length {length[:40]!r}")
        self.left = 0 if self.chunked else int(length)
        self.done = False

    def _cut(self):
        raise errors.TransportError("the connection was cut in the middle of the request")

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except (ssl.SSLError, OSError) as e:
            # A TLS record that fails its check (bytes changed on the way) or a reset is a
            # broken connection, refused like a cut one: not an internal error.
            self.done = True
            raise errors.TransportError(f"the connection failed in the middle of the "
                                        f"request: {e}") from None

    def _read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.chunked and self.left == 0:
            line = self.rfile.readline(1024)
            if not line:
                self._cut()
            size = line.split(b";")[0].strip() or b"0"
            if len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                # (int(x, 16) took "-1": read(-1) waited for the client to close)
                self.done = True
                raise errors.UsageError("malformed chunked request body")
            self.left = int(size, 16)
            if self.left == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                self.done = True
                return b""
        if not self.chunked and self.left == 0:
            self.done = True
            return b""
        piece = self.rfile.read(min(n, self.left))
        if not piece:
            self._cut()
        self.left -= len(piece)
        if self.chunked and self.left == 0:
            self.rfile.readline(8)
        return piece


Route = tuple[str, re.Pattern, Callable[[Request], Any]]


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, pattern: str, fn: Callable[[Request], Any]) -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self.routes.append((method, regex, fn))

    def route(self, method: str, pattern: str):
        def deco(fn):
            self.add(method, pattern, fn)
            return fn
        return deco

    def match(self, method: str, path: str):
        allowed = False
        for m, regex, fn in self.routes:
            found = regex.match(path)
            if found:
                if m == method:
                    return fn, found.groupdict()
                allowed = True
        return None, allowed


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vmreplica"
    server: UnixHTTPServer | TLSHTTPServer     # the two below: each carries its router

    def log_message(self, fmt, *args):  # quiet: the daemon logs what matters itself
        log.debug("%s " + fmt, self.client_address, *args)

    def setup(self):
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            # A reply is written in pieces (headers, then body): with Nagle on, the body
            # waits for the client's delayed ACK of the headers, 40 ms on Linux.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(60)
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as e:
                log.info("TLS handshake failed from %s: %s", self.client_address, e)
                raise
            from .tls import peer_fingerprint
            self.peer_fingerprint = peer_fingerprint(sock)
        super().setup()

    def handle(self):
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.info("connection from %s ended: %s", self.client_address, e)

    def _dispatch(self):
        fn, params = self.server.router.match(self.command, urlsplit(self.path).path)
        if fn is None:
            code = 405 if params else 404
            return self._send_json(code, {"error": {"code": "not_found",
                                                    "message": f"no such endpoint {self.path}"}})
        req = Request(self, params)
        try:
            result = fn(req)
        except Exception as e:  # noqa: BLE001 — answered, or the error is the answer
            if not req.answered:
                return self._failed(req, e)
            log.error("%s %s failed after its answer: %s", self.command, self.path,
                      getattr(e, "message", None) or e, exc_info=not isinstance(
                          e, errors.VmreplicaError))
            return None
        if req.answered:
            return None
        if req._reader is not None and not req._reader.done:
            # Consume what is left of the body (a chunked stream's last, empty chunk):
            # closing with unread bytes makes TCP reset the connection, and the client
            # can lose the end of our answer.
            self._drain(req)
            self.close_connection = True
        if result is None:
            result = {}
        if isinstance(result, Response):
            return self._send_response(result)
        if isinstance(result, (dict, list)):
            return self._send_json(200, result)
        return self._send_stream(result)

    def _failed(self, req: Request, e: Exception) -> None:
        """A route raised before answering: the error as JSON (an unexpected one logged)."""
        if not isinstance(e, errors.VmreplicaError):   # the daemon must answer, not die
            log.error("internal error on %s %s", self.command, self.path, exc_info=e)
        self._drain(req)
        if isinstance(e, errors.VmreplicaError):
            return self._send_json(_STATUS.get(e.code, 500), {"error": e.to_json()})
        return self._send_json(500, {"error": {"code": "error",
                                               "message": f"internal error: {e}"}})

    def _drain(self, req: Request) -> None:
        """After an error, read what is left of the body (small) or close the connection."""
        if self.command not in ("POST", "PUT", "DELETE"):
            return
        # Reading the rest (up to a bound) lets the client see the error instead of a reset.
        budget = 8 << 30
        try:
            body = req.body()
            while budget > 0:
                piece = body.read(1 << 20)
                if not piece:
                    return
                budget -= len(piece)
        except Exception:  # noqa: BLE001
            pass
        self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line or header, an unsupported
        method) as the same JSON errors as the routes', not an HTML page."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":   # an unparsable request line: still say why
            self.request_version = "HTTP/1.0"
        if code == 501:                            # a method no route has (PATCH, ...)
            code = 405
        try:
            self._send_json(code, {"error": {"code": "usage" if code < 500 else "error",
                                             "message": message or f"HTTP {code}",
                                             "hint": explain}})
        except OSError:
            pass

    def _send_json(self, code: int, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_response(self, r: Response) -> None:
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        for k, v in r.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(r.body)

    def _send_stream(self, chunks: Iterator[bytes]) -> None:
        """Stream lines (NDJSON progress, event follow) with chunked encoding."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            idle = 0
            for piece in chunks:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    idle = 0
                else:
                    idle += 1
                    if idle % 10 == 0 and _peer_gone(self.connection):
                        break
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch


def _peer_gone(sock) -> bool:
    """A streaming answer's client closed its end (reads EOF without blocking)."""
    import select
    try:
        r, _, _ = select.select([sock], [], [], 0)
        return bool(r) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, router: Router):
        self.router = router
        super().__init__(path, Handler)

    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)


class TLSHTTPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], router: Router,
                 context_provider: Callable[[], ssl.SSLContext]):
        self.router = router
        self.context_provider = context_provider
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def get_request(self):
        sock, addr = super().get_request()
        ctx = self.context_provider()
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


def serve_in_thread(server: socketserver.BaseServer, name: str) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name=name, daemon=True)
    t.start()
    return t
