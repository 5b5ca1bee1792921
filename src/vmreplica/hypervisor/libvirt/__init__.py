"""The `libvirt` driver: VMs are libvirt domains (libvirt-python), for hosts that run libvirtd.

Same protocol and semantics as the embedded `qemu` driver; change tracking goes through
libvirt checkpoints and pull-mode backups while a domain runs, and through a
qemu-storage-daemon on the same persistent bitmaps while it is shut off. What this
driver lacks (``io``, ``--share-rw``, live views) raises ``Unsupported``.

One module per concern; each says what it owns:

    domainxml     the domain XML and vmreplica's metadata in it; naming; existing
                  domains (no vmreplica metadata) read as VMs
    connection    libvirtd connection, lookups, definition writes, QMP passthrough
    inventory     list, create, define, delete; start, stop, pause, resume; files
    agent         guest agent, the VM checker (check), managed save
    checkpoints   a block session's checkpoints and bitmaps
    block         block sessions' frozen views (pull backups, storage daemon)
    mirror        continuous mode: the mirror through a relay, the domain's monitor
    collapse      a failed-over VM's chain merged into its base, live
    driver        LibvirtDriver, combining the parts
"""

from .driver import LibvirtDriver

__all__ = ["LibvirtDriver"]
