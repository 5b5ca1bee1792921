"""``LibvirtDriver``: the libvirt driver assembled from its parts, one module each
(hypervisor/base.py's Protocols): inventory and power (inventory), guest agent, VM
checker and save/restore (agent), block sessions (block, checkpoints), continuous mode's
mirror (mirror), live collapse (collapse), over the connection and lookups they share
(connection) and the domain XML (domainxml)."""

from __future__ import annotations

from .agent import GuestAgentPart
from .block import BlockAccessPart
from .collapse import CollapsePart
from .inventory import Inventory
from .mirror import MirrorPart


class LibvirtDriver(Inventory, GuestAgentPart, BlockAccessPart, MirrorPart, CollapsePart):
    """VMs as libvirt domains (see the package's docstring)."""

    name = "libvirt"
