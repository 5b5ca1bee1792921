"""The error hierarchy: every error carries the one line a user reads and an exit code.

UsageError (exit 2): the command was wrong (unknown VM, bad option, enabling twice).
OperationError (exit 1): the command was right but the operation failed (unreachable
replica, refused by the replica, a disk the hypervisor cannot serve).
Each module raises the most specific subclass; the CLI prints ``str(err)`` and exits
with ``err.exit_code``; the management API carries ``code`` and ``message`` in JSON.
"""

from __future__ import annotations


class VmreplicaError(Exception):
    exit_code = 1
    code = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class UsageError(VmreplicaError):
    exit_code = 2
    code = "usage"


class NotFound(UsageError):
    code = "not_found"


class Conflict(UsageError):
    code = "conflict"


class Unsupported(UsageError):
    """This host's hypervisor driver lacks the capability asked for (its interface,
    hypervisor/base.py, says which parts a driver may lack); the message names it."""

    code = "unsupported"


class OperationError(VmreplicaError):
    exit_code = 1
    code = "operation"


class HypervisorError(OperationError):
    code = "hypervisor"


class StorageFull(OperationError):
    """A write found no space left (ENOSPC)."""
    code = "storage_full"


class TrackingError(OperationError):
    """Change tracking cannot be trusted (bitmap missing, inconsistent, ...)."""

    code = "tracking"


class TransportError(OperationError):
    code = "transport"


class Unreachable(TransportError):
    code = "unreachable"


class NotTrusted(TransportError):
    code = "not_trusted"
    # A pinned peer that presented another certificate: both fingerprints
    # (transport.client), for the message that compares them (service.trust).
    presented: str | None = None
    expected: str | None = None


class Refused(OperationError):
    """The peer understood the request and said no (authorization, epoch, tag...)."""

    code = "refused"


class Superseded(Refused):
    """Another host has become the primary of this VM (failover, higher epoch)."""

    code = "superseded"


class Removed(Refused):
    """The replica ended this relationship (`remove` ran there while this host, its
    primary, could not be told): the primary ends its side too."""

    code = "removed"


class IntegrityError(OperationError):
    code = "integrity"


class DaemonNotRunning(OperationError):
    code = "daemon_not_running"


def _every(cls: type[VmreplicaError]) -> list[type[VmreplicaError]]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _every(sub)]


# Every error class by its code, found from the hierarchy itself: a class left out of a
# hand-written table (StorageFull was) reached the client as a plain OperationError, so
# its health rule and hint were lost on the way.
_BY_CODE = {cls.code: cls for cls in _every(VmreplicaError) if "code" in vars(cls)}


def from_json(data: dict) -> VmreplicaError:
    cls = _BY_CODE.get(data.get("code", "error"), OperationError)
    return cls(data.get("message", "unknown error"), hint=data.get("hint"))
