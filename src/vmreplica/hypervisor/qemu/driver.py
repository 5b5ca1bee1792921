"""``QemuDriver``: the embedded qemu driver assembled from its parts, one module each
(hypervisor/base.py's Protocols): inventory, power and save/restore (inventory), guest
agent and VM checker (agent), block access (block, with its sessions in session),
continuous mode's mirror (mirror), live collapse (collapse), over the VM's files they
share (files) and the QEMU command line (cmdline)."""

from __future__ import annotations

from .agent import GuestAgentPart
from .block import BlockAccessPart
from .collapse import CollapsePart
from .inventory import Inventory
from .mirror import MirrorPart


class QemuDriver(BlockAccessPart, Inventory, GuestAgentPart, MirrorPart, CollapsePart):
    """VMs as QEMU processes this host starts itself (see the package's docstring)."""

    name = "qemu"
