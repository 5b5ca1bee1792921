"""The qemu driver's guest agent and VM checker: guest-agent commands over the agent's
socket (qemutools.qga), file-system freeze and thaw, and ``check`` (the process, its run
state asked on a monitor of its own, so a check never waits for a cycle, the agent's
answer to guest-ping).
"""

from __future__ import annotations

from ...errors import Conflict, HypervisorError
from ...qemutools.qga import agent_call
from ...qemutools.qmp import Monitor
from ..base import VMCheck, process_age
from .files import QemuFiles


class GuestAgentPart(QemuFiles):
    def agent_command(self, name: str, command: str, arguments: dict | None = None,
                      timeout: float = 10.0, expect_reply: bool = True):
        desc = self._load(name)
        if not desc.get("agent"):
            raise HypervisorError(f"VM {name} has no guest agent channel")
        if not self._pid(desc):
            raise Conflict(f"VM {name} is not running")
        return agent_call(self._rt(desc, "qga"), command, arguments, timeout, expect_reply)

    def freeze_filesystems(self, name: str, timeout: float = 15.0) -> None:
        """Quiesce the guest's file systems (qemu-guest-agent fsfreeze) for a consistent point."""
        self.agent_command(name, "guest-fsfreeze-freeze", timeout=timeout)

    def thaw_filesystems(self, name: str) -> None:
        self.agent_command(name, "guest-fsfreeze-thaw", timeout=10)

    def check(self, name: str) -> VMCheck:
        """The VM checker's view: process, QMP run state, guest agent (if it has one)."""
        desc = self._load(name)
        pid = self._pid(desc)
        out: VMCheck = {"process": bool(pid), "qmp": None, "agent": None, "uptime": None}
        if not pid:
            return out
        out["uptime"] = process_age(pid)
        try:
            with Monitor(self._rt(desc, "qmpc"), timeout=5, connect_timeout=3) as m:
                out["qmp"] = m.execute("query-status").get("status")
        except HypervisorError as e:
            out["qmp"] = f"error: {e.message}"
        if desc.get("agent"):
            try:
                agent_call(self._rt(desc, "qga"), "guest-ping", None, 5)
                out["agent"] = "ok"
            except HypervisorError as e:
                out["agent"] = f"error: {e.message}"
        return out
