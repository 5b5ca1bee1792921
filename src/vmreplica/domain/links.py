"""Links: the relationships of one VM on one host.

A VM has at most one *main* relationship (keyed by its name: primary or replica) and, on
the host that runs it, at most one *disaster-recovery link*: a periodic replication of
the same disks to a third host, keyed ``NAME@dr``. The DR link follows the VM: when the
VM moves to its partner (the main relationship's other side, e.g. the other cluster
node), the partner takes the link over (a higher epoch on the DR host) and settles what
is in doubt with a hash resync; the side it left stands by. VM names never contain
``@`` (domain.patterns), so the key tells the VM.
"""

from __future__ import annotations

from .relationship import Relationship

DR = "dr"
SEP = "@"


def dr_key(vm: str) -> str:
    return f"{vm}{SEP}{DR}"


def vm_name(key: str) -> str:
    """The VM a relationship key belongs to."""
    return key.partition(SEP)[0]


def is_dr(key: str) -> bool:
    return key.endswith(SEP + DR)


def runs_here(main: Relationship | None) -> bool:
    """Whether this host holds the authoritative, running copy of the VM, judged by the
    VM's main relationship: none (the VM is only DR-protected), the unfenced primary, or
    a replica that has failed over (it runs the VM alone until it reverses)."""
    if main is None:
        return True
    if main.role == "primary":
        return not main.fenced
    return main.state == "failed_over"
