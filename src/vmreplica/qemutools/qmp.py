"""A small synchronous QMP client (QEMU Machine Protocol) with timeouts on every step.

Used for VM QEMUs and qemu-storage-daemons alike. Synchronous and thread-friendly (one
client per socket at a time, the caller serialises), events are kept for whoever asks.
Every failure is a ``HypervisorError`` that names the command and QEMU's reason.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import time
from pathlib import Path

from ..errors import HypervisorError

log = logging.getLogger("vmreplica.qmp")


class QMPError(HypervisorError):
    def __init__(self, command: str, klass: str, desc: str):
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command, self.klass, self.desc = command, klass, desc


_IDS = itertools.count(1)


def result(command: str, reply: dict):
    """What QEMU's ``reply`` to ``command`` returns; QMPError if it refused. (The libvirt
    driver reads the replies libvirt passes through with it too.)"""
    if "error" in reply:
        err = reply["error"]
        raise QMPError(command, err.get("class", ""), err.get("desc", ""))
    return reply.get("return")


class Monitor:
    def __init__(self, path: str | Path, timeout: float = 30.0, connect_timeout: float = 10.0,
                 oob: bool = False, sock: socket.socket | None = None):
        """Connect to the monitor listening at ``path``, or (``sock``) talk over a
        connection QEMU made to us (a storage daemon's client-mode monitor, see qsd)."""
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict] = []
        for attempt in (1, 2):
            self._buf = b""
            self._sock = sock if sock is not None else self._connect(connect_timeout)
            try:
                greeting = self._read_message(connect_timeout)
                if "QMP" not in greeting:
                    raise HypervisorError(f"{self.path} is not a QMP monitor")
                # Out-of-band commands (yank) run even while QEMU's main loop is stuck, e.g.
                # on I/O to a hung NBD server; the monitor must have been negotiated for them.
                self.execute("qmp_capabilities", {"enable": ["oob"]} if oob else None)
                return
            except QMPError as e:
                self.close()
                # Once in a CI run (stop 12) a fresh qemu-storage-daemon answered our
                # well-formed handshake with "QMP input member 'exceute' is unexpected"
                # (a race in QEMU when a client connects to a monitor that is still being
                # set up: see qsd.StorageDaemon.start): the handshake is idempotent, so it
                # is tried once more on a new connection, and the oddity logged.
                if attempt == 2 or e.klass != "GenericError" or sock is not None:
                    raise
                log.warning("QEMU monitor %s refused the handshake (%s); connecting again",
                            self.path, e)
            except BaseException:
                self.close()
                raise

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise HypervisorError(f"cannot connect to QEMU monitor {self.path}: "
                                          f"{e.strerror}") from None
                time.sleep(0.01)

    def _read_message(self, timeout: float, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HypervisorError(f"QEMU monitor {self.path} did not answer "
                                      f"{what + ' ' if what else ''}within {timeout:.0f} s")
            self._sock.settimeout(left)
            try:
                piece = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise HypervisorError(f"QEMU monitor {self.path} failed: {e}") from None
            if not piece:
                raise HypervisorError(f"QEMU monitor {self.path} closed the connection")
            self._buf += piece
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, arguments: dict | None = None,
                timeout: float | None = None):
        # Each command carries an id and only the reply with that id answers it: a reply
        # to something else (seen in a stress run, where QEMU set up a monitor twice for
        # one connection: a second greeting, a `quit` "answered" by another command's
        # reply) is logged and skipped, never taken for ours.
        ident = f"vmr-{next(_IDS)}"
        msg: dict = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise HypervisorError(f"QEMU monitor {self.path} failed: {e}") from None
        while True:
            reply = self._read_message(timeout or self.timeout, command)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != ident:
                log.warning("QEMU monitor %s: a reply that is not for %s (id %s): %s; skipped",
                            self.path, command, ident, json.dumps(reply)[:300])
                continue
            return result(command, reply)

    def execute_oob(self, command: str, arguments: dict | None = None,
                    timeout: float = 5.0):
        msg: dict = {"exec-oob": command, "id": f"oob-{time.monotonic_ns()}"}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise HypervisorError(f"QEMU monitor {self.path} failed: {e}") from None
        while True:
            reply = self._read_message(timeout)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg["id"]:
                continue        # a late answer to an in-band command; not ours
            return result(command, reply)

    def wait_event(self, name: str, timeout: float, match=None) -> dict:
        """Return (and consume) the first event ``name`` (optionally matching ``match(ev)``)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (match is None or match(ev)):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise HypervisorError(f"QEMU did not report {name} within {timeout:.0f} s")
            reply = self._read_message(left)
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
