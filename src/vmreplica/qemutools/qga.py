"""The QEMU guest agent's protocol (qemu-guest-agent): a command and its answer.

``agent_call`` speaks it over the agent's virtio-serial socket (the qemu driver's VMs),
with the ``guest-sync-delimited`` handshake first; the libvirt driver passes the same
messages through libvirt (``qemuAgentCommand``) and reads the answer with ``result``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from ..errors import HypervisorError


def request(command: str, arguments: dict | None = None) -> dict:
    """The message that asks the agent to run ``command``."""
    msg: dict = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return msg


def result(command: str, reply: dict):
    """What the agent's ``reply`` to ``command`` returns; HypervisorError if it refused."""
    if "error" in reply:
        raise HypervisorError(f"guest agent refused {command}: {reply['error'].get('desc')}")
    return reply.get("return")


def agent_call(path: Path, command: str, arguments: dict | None, timeout: float,
               expect_reply: bool = True):
    """One guest-agent command over its virtio-serial socket, with a sync handshake first."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise HypervisorError(f"guest agent socket {path}: {e}") from None
        f = s.makefile("rwb", buffering=0)
        sync_id = int(time.monotonic_ns() % 1_000_000_000)
        s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                        "arguments": {"id": sync_id}}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            line = _agent_line(f, deadline)
            try:
                if json.loads(line.lstrip(b"\xff")).get("return") == sync_id:
                    break
            except ValueError:
                continue
        s.sendall(json.dumps(request(command, arguments)).encode() + b"\n")
        if not expect_reply:
            return None
        reply = json.loads(_agent_line(f, deadline).lstrip(b"\xff"))
    except TimeoutError:
        raise HypervisorError(f"the guest agent did not answer {command} within {timeout:.0f} s") from None
    except OSError as e:          # the VM (and its agent channel) went away mid-call
        raise HypervisorError(f"guest agent {command}: {e}") from None
    finally:
        s.close()
    return result(command, reply)


def _agent_line(f, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        if time.monotonic() > deadline:
            raise TimeoutError
        c = f.read(1)
        if not c:
            raise HypervisorError("the guest agent closed its channel")
        buf += c
    return buf.strip()
