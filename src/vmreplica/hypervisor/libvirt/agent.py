"""The libvirt driver's guest agent, VM checker and save/restore: guest-agent commands
through libvirt (``qemuAgentCommand``; guest-shutdown through libvirt's own call),
file-system freeze and thaw; ``check`` reads libvirt's domain state and reason (no call
into QEMU) and says it in QMP's words, the agent answers ``guest-ping`` through libvirt;
``save`` is ``virDomainManagedSave`` (the image in libvirt's save directory; ``start``
resumes from it, ``discard_saved`` and ``delete`` remove it).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import libvirt
import libvirt_qemu

from ...errors import Conflict, HypervisorError
from ...qemutools import qga
from ..base import VMCheck, process_age
from .connection import LibvirtBase, lv_error

log = logging.getLogger("vmreplica.libvirt")


class GuestAgentPart(LibvirtBase):
    # -- guest agent -----------------------------------------------------------------
    def agent_command(self, name: str, command: str, arguments: dict | None = None,
                      timeout: float = 10.0, expect_reply: bool = True):
        dom, _, vm = self._load(name)
        if not vm.agent:
            raise HypervisorError(f"VM {name} has no guest agent channel")
        if not self._active(dom):
            raise Conflict(f"VM {name} is not running")
        if command == "guest-shutdown" and not expect_reply:
            # guest-shutdown never answers: libvirt's own call knows how to wait for it.
            try:
                dom.agentSetResponseTimeout(max(1, int(timeout)))
                flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
                if (arguments or {}).get("mode") == "reboot":
                    dom.reboot(libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT)
                else:
                    dom.shutdownFlags(flags)
            except libvirt.libvirtError as e:
                raise HypervisorError(f"the guest agent did not take {command}: "
                                      f"{lv_error(e)}") from None
            return None
        msg = qga.request(command, arguments)
        try:
            raw = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), max(1, round(timeout)), 0)
        except libvirt.libvirtError as e:
            if not expect_reply:
                return None
            text = lv_error(e)
            if e.get_error_code() in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
                                      libvirt.VIR_ERR_AGENT_UNSYNCED) or "timeout" in text.lower():
                raise HypervisorError(f"the guest agent did not answer {command} within "
                                      f"{timeout:.0f} s ({text})") from None
            m = re.search(r"unable to execute QEMU agent command '[^']*': (.*)", text)
            if m:
                raise HypervisorError(f"guest agent refused {command}: {m.group(1)}") from None
            raise HypervisorError(f"guest agent command {command} failed: {text}") from None
        if not expect_reply:
            return None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise HypervisorError(f"the guest agent answered {command} with {raw!r}") from None
        return qga.result(command, reply)

    def freeze_filesystems(self, name: str, timeout: float = 15.0) -> None:
        """Quiesce the guest's file systems (qemu-guest-agent fsfreeze) for a consistent point."""
        self.agent_command(name, "guest-fsfreeze-freeze", timeout=timeout)

    def thaw_filesystems(self, name: str) -> None:
        self.agent_command(name, "guest-fsfreeze-thaw", timeout=10)

    # -- the VM checker, save / restore (the cluster's agent and `save` stop mode) -------
    def check(self, name: str) -> VMCheck:
        """The VM checker's view, as the qemu driver gives it: whether QEMU runs, its run
        state in QMP's words (from libvirt's domain state and reason, which libvirt keeps
        without asking QEMU: a check never waits behind a job holding the monitor), the
        guest agent's answer to guest-ping (None for a VM without an agent), uptime;
        ``state`` is libvirt's own words ("paused (user)", "shut off (crashed)")."""
        dom, _, vm = self._load(name)
        try:
            st, reason = dom.state()
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        running = st not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE) \
            and self._active(dom)
        out: VMCheck = {"process": running, "qmp": None, "agent": None, "uptime": None,
                        "state": _state_words(st, reason)}
        if not out["process"]:
            return out
        out["qmp"] = _qmp_status(st, reason)
        pid = self._pid(dom)
        out["uptime"] = process_age(pid) if pid else None
        if vm.agent:
            try:
                self.agent_command(name, "guest-ping", timeout=5)
                out["agent"] = "ok"
            except (HypervisorError, Conflict) as e:
                out["agent"] = f"error: {e.message}"
        return out

    def save(self, name: str, timeout: float = 300.0) -> Path:
        """Save the running domain's memory and device state (virDomainManagedSave: QEMU
        migrates to libvirt's managed save image, disks flushed, persistent bitmaps
        stored, then the domain stops); the next start resumes from it (libvirt does)."""
        dom, _, _ = self._load(name)
        if not self._active(dom):
            raise Conflict(f"VM {name} is not running")
        timer = threading.Timer(timeout, _abort_job, (dom,))
        timer.daemon = True
        timer.start()
        try:
            dom.managedSave(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"saving the state of {name} failed: {lv_error(e)}") from None
        finally:
            timer.cancel()
        self._pause_mark(name).unlink(missing_ok=True)   # resumed as it was saved
        return self._managed_save_path(dom)

    def saved_state(self, name: str) -> Path | None:
        dom, _, _ = self._load(name)
        try:
            has = dom.hasManagedSaveImage(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: {lv_error(e)}") from None
        return self._managed_save_path(dom) if has else None

    def discard_saved(self, name: str) -> None:
        dom, _, _ = self._load(name)
        try:
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not remove the saved state of {name}: "
                                  f"{lv_error(e)}") from None

    def _managed_save_path(self, dom: libvirt.virDomain) -> Path:
        """Where libvirt keeps a domain's managed save image (it has no call that says:
        the system daemon's save directory, or the session daemon's)."""
        if self.uri.split("?")[0].endswith("/system"):
            return Path("/var/lib/libvirt/qemu/save") / f"{dom.name()}.save"
        return Path.home() / ".config/libvirt/qemu/save" / f"{dom.name()}.save"


# libvirt's domain states and their reasons (libvirt's enums, in order), as `virsh
# domstate --reason` words, and the QMP run state each means (the VM checker's words).
_STATES = ["no state", "running", "blocked", "paused", "shutting down", "shut off", "crashed",
           "pmsuspended"]
_REASONS = {
    libvirt.VIR_DOMAIN_RUNNING: ["unknown", "booted", "migrated", "restored", "from snapshot",
                                 "unpaused", "migration canceled", "save canceled", "wakeup",
                                 "crashed", "post-copy", "post-copy failed"],
    libvirt.VIR_DOMAIN_PAUSED: ["unknown", "user", "migrating", "saving", "dumping",
                                "I/O error", "watchdog", "from snapshot", "shutting down",
                                "creating snapshot", "crashed", "starting up", "post-copy",
                                "post-copy failed", "api error"],
    libvirt.VIR_DOMAIN_SHUTDOWN: ["unknown", "user"],
    libvirt.VIR_DOMAIN_SHUTOFF: ["unknown", "shutdown", "destroyed", "crashed", "migrated",
                                "saved", "failed", "from snapshot", "daemon"],
    libvirt.VIR_DOMAIN_CRASHED: ["unknown", "panicked"],
}
_PAUSED_QMP = ["paused", "paused", "postmigrate", "save-vm", "paused", "io-error", "watchdog",
               "restore-vm", "shutdown", "save-vm", "guest-panicked", "prelaunch",
               "postmigrate", "postmigrate", "internal-error"]


def _state_words(state: int, reason: int) -> str:
    words = _STATES[state] if 0 <= state < len(_STATES) else f"state {state}"
    reasons = _REASONS.get(state, [])
    return f"{words} ({reasons[reason] if 0 <= reason < len(reasons) else reason})"


def _qmp_status(state: int, reason: int) -> str:
    """The QMP run state a running domain's libvirt state and reason stand for."""
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return "running"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return _PAUSED_QMP[reason] if 0 <= reason < len(_PAUSED_QMP) else "paused"
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return "shutdown"
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "guest-panicked"
    if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        return "suspended"
    return _state_words(state, reason)


def _abort_job(dom: libvirt.virDomain) -> None:
    """A save that took too long: libvirt aborts it, the domain goes on running."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        log.warning("aborting the save of %s: %s", dom.name(), lv_error(e))
