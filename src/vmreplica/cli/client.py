"""A tiny HTTP/1.1 client for the management API on the home's unix socket.

Written on bare sockets (no http.client) so a CLI call stays fast: the benchmark times
whole `vmreplica sync` commands.
"""

from __future__ import annotations

import json
import socket

from .. import errors


class Client:
    def __init__(self, home, timeout: float | None = None):
        self.home = home
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: vmreplica\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.home.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise errors.DaemonNotRunning(
                    f"no vmreplica daemon is running for {self.home.root}",
                    hint=f"start it with `vmreplica --home {self.home.root} serve --detach`") from None
            s.sendall(head.encode() + data)
            chunks = []
            while True:
                piece = s.recv(1 << 16)
                if not piece:
                    break
                chunks.append(piece)
        except TimeoutError:
            raise errors.OperationError("the daemon did not answer in time") from None
        except (ConnectionResetError, BrokenPipeError):
            # A daemon that closed its socket under us: one stopping, or the previous
            # daemon of this home still closing while a new one starts.
            raise errors.OperationError("the daemon closed the connection without an answer",
                                        hint=f"see {self.home.log}") from None
        finally:
            s.close()
        raw = b"".join(chunks)
        header, _, payload = raw.partition(b"\r\n\r\n")
        if not header.startswith(b"HTTP/1."):
            raise errors.OperationError("the daemon closed the connection without an answer",
                                        hint=f"see {self.home.log}")
        status = int(header.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in header.lower():
            payload = _dechunk(payload)
        result = json.loads(payload) if payload else {}
        if status >= 400:
            raise errors.from_json(result.get("error") or {"message": f"HTTP {status}"})
        return result


    def stream(self, path: str):
        """GET a streaming (chunked NDJSON) answer; yields one decoded object per line."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.home.socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise errors.DaemonNotRunning(
                f"no vmreplica daemon is running for {self.home.root}",
                hint=f"start it with `vmreplica --home {self.home.root} serve --detach`") from None
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: vmreplica\r\nConnection: close\r\n\r\n".encode())
        f = s.makefile("rb")
        status = f.readline()
        if b" 200 " not in status:
            rest = f.read()
            _, _, body = rest.partition(b"\r\n\r\n")
            try:
                err = json.loads(body).get("error") or {}
            except ValueError:
                err = {"message": status.decode(errors="replace").strip()}
            raise errors.from_json(err)
        while f.readline() not in (b"\r\n", b""):
            pass
        buf = b""
        while True:
            size_line = f.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            buf += f.read(size)
            f.readline()
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if line.strip():
                    yield json.loads(line)


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2
