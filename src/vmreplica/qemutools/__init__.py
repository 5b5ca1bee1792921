"""Wrappers of QEMU's own tools: QMP monitors (`qmp`), qemu-img (`img`),
qemu-storage-daemon (`qsd`), NBD readers (`nbdio`, `imagemap`), the guest agent's
protocol (`qga`), and the QMP steps both hypervisor drivers run (`qmpsteps`: continuous
mode's mirror, the guest held quiet while it ends, dirty-bitmap transactions, NBD views).

Used by hypervisor drivers, trackers and the replica store. May import `errors` only.
"""
