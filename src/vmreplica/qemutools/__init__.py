"""Wrappers of QEMU's own tools: QMP monitors, qemu-img, qemu-storage-daemon, NBD readers.

Used by hypervisor drivers, trackers and the replica store. May import `errors` only.
"""
